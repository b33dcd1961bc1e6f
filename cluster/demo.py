"""`make demo`: Herd's whole story on this machine, through the `herd` CLI and the OpenAI API.

1. a tiny Llama 2-shaped base model (Herd's own tokenizer, a short pre-training on the KJV text)
2. a synthetic task with a held-out split (llama/demo_task.py: pick out the number in a list)
3. the OpenAI-compatible endpoint on Ray Serve, serving the base model
4. every held-out prompt asked of the base model, through the HTTP API
5. a LoRA adapter fine-tuned on Ray Train (2 workers, DeepSpeed ZeRO-2), promoted onto the
   running endpoint (`herd finetune submit --promote --follow` prints the hand-off)
6. every held-out prompt asked of the adapter, through the same endpoint, with no restart
7. a table (prompt, base, adapter, expected), each model's exact-match accuracy, stage times

`python -m cluster.demo --quick` runs the same story on 30 held-out prompts (the test; shorter
training did not learn the rule, see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llama.demo_task import accuracy, exact_match, task_splits

console = Console()
HERD = str(Path(sys.executable).parent / "herd")
BASE, ADAPTER = "demo", "find-number"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Recipe:
    """How much of everything the story uses (the full demo, or `--quick` for the test)."""

    pretrain_steps: int = 400
    n_train: int = 2400
    n_heldout: int = 50
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 3e-3
    batch_size: int = 8
    lora_rank: int = 16


QUICK = Recipe(n_heldout=30)


@dataclass
class StoryResult:
    prompts: list[str]
    expected: list[str]
    base: list[str]
    adapter: list[str]
    stages: dict[str, float] = field(default_factory=dict)
    replicas_before: list[str] = field(default_factory=list)
    replicas_after: list[str] = field(default_factory=list)
    handoff: str = ""
    base_url: str = ""

    @property
    def base_accuracy(self) -> float:
        return accuracy(self.base, self.expected)

    @property
    def adapter_accuracy(self) -> float:
        return accuracy(self.adapter, self.expected)


def herd(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run one `herd` command as a user would (echoed); stop the story if it fails."""
    console.print(f"[dim]$ herd {' '.join(args)}[/]", highlight=False)
    proc = subprocess.run([HERD, *args], text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            console.print(proc.stdout + proc.stderr, highlight=False)
        raise RuntimeError(f"`herd {' '.join(args)}` failed with exit code {proc.returncode}")
    return proc


def ask_all(base_url: str, model: str, prompts: list[str], max_tokens: int = 6) -> list[str]:
    """Every prompt through the real openai client (greedy, 8 at a time so the engine batches them)."""
    import openai
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("HERD_API_KEY", "none"), max_retries=5,
                           timeout=120)

    def one(prompt: str) -> str:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0)
        return out.choices[0].message.content or ""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def replica_ids() -> list[str]:
    """Ids of the endpoint's running replicas (the same ids before and after = no restart)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from cluster.ray_cluster import job_api_url
    from cluster.serve_control import APP_NAME, DEPLOYMENT
    details = ServeSubmissionClient(job_api_url(None)).get_serve_details()
    deployment = details["applications"][APP_NAME]["deployments"][DEPLOYMENT]
    return sorted(r["replica_id"] for r in deployment.get("replicas", []) if r.get("state") == "RUNNING")


def _free_port() -> int:
    for port in (8000, 8001, 8002, 8080):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(n: int, title: str) -> None:
    console.rule(f"[bold cyan]{n}. {title}")


def run_story(recipe: Recipe, workdir: Path, port: int | None = None) -> StoryResult:
    """The story, stage by stage; returns what each model answered and how long each stage took."""
    stages: dict[str, float] = {}
    workdir.mkdir(parents=True, exist_ok=True)

    _step(1, f"A tiny Llama 2-shaped base model, pre-trained {recipe.pretrain_steps} steps on the KJV text")
    t = time.time()
    models = json.loads(herd("models", "list", "--json", capture=True).stdout)
    if any(m["name"] == BASE for m in models):
        console.print(f"model {BASE!r} already exists")
    else:
        herd("models", "create-tiny", "--name", BASE, "--train-steps", str(recipe.pretrain_steps))
    stages["base model"] = time.time() - t

    _step(2, "The task: pick out the number hidden in a list of names (llama/demo_task.py)")
    train, heldout = task_splits(recipe.n_train, recipe.n_heldout, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    (workdir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    for r in train[:3]:
        console.print(f"  {json.dumps(r)}", highlight=False)
    console.print(f"{len(train)} training examples in {data}; {len(heldout)} held-out prompts in "
                  f"{workdir / 'heldout.jsonl'}, none of them in training")

    _step(3, "Serve the base model on Ray Serve (OpenAI-compatible API)")
    t = time.time()
    port = port or _free_port()
    herd("serve", "deploy", "--model", BASE, "--port", str(port), "--max-loras", "4")
    base_url = f"http://127.0.0.1:{port}/v1"
    before = replica_ids()
    stages["deploy endpoint"] = time.time() - t

    prompts, expected = [r["prompt"] for r in heldout], [r["completion"] for r in heldout]
    _step(4, f"Ask the base model every held-out prompt ({base_url}, model {BASE!r})")
    t = time.time()
    base_replies = ask_all(base_url, BASE, prompts)
    stages[f"ask base ({len(prompts)} prompts)"] = time.time() - t
    console.print(f"base model: {accuracy(base_replies, expected):.0f}% exact match")

    _step(5, "Fine-tune a LoRA adapter (Ray Train, 2 workers, DeepSpeed ZeRO-2) and promote it onto the endpoint")
    t = time.time()
    args = ["finetune", "submit", "--model", BASE, "--data", str(data), "--adapter", ADAPTER, "--workers", "2",
            "--zero", "2", "--epochs", str(recipe.epochs), "--lr", str(recipe.lr), "--batch-size",
            str(recipe.batch_size), "--lora-rank", str(recipe.lora_rank), "--lora-alpha", str(2 * recipe.lora_rank),
            "--lora-targets", LORA_TARGETS, "--checkpoint-every", "1000", "--promote", "--follow"]
    if recipe.max_steps:
        args[-2:-2] = ["--max-steps", str(recipe.max_steps)]
    console.print(f"[dim]$ herd {' '.join(args)}[/]", highlight=False)
    for attempt in range(4):  # a Ray head that just started may not have its job agent yet
        proc = subprocess.run([HERD, *args], text=True, stderr=subprocess.PIPE)
        sys.stderr.write(proc.stderr)
        if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr:
            break
        console.print("the Ray job agent is not up yet; submitting again in 10 s")
        time.sleep(10)
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning failed with exit code {proc.returncode}")
    stages["fine-tune + promote"] = time.time() - t

    model = f"{BASE}:{ADAPTER}"
    _step(6, f"Ask the adapter every held-out prompt (same endpoint, model {model!r})")
    t = time.time()
    adapter_replies = ask_all(base_url, model, prompts)
    stages[f"ask adapter ({len(prompts)} prompts)"] = time.time() - t
    return StoryResult(prompts, expected, base_replies, adapter_replies, stages, before, replica_ids(),
                       proc.stderr, base_url)


def print_report(result: StoryResult, total_s: float) -> None:
    table = Table("prompt", "base", "adapter", "expected", title="held-out prompts (never seen in training)")
    for p, b, a, e in zip(result.prompts, result.base, result.adapter, result.expected):
        mark = "[green]" if exact_match(a, e) else "[red]"
        table.add_row(p, repr(b.strip())[:28], f"{mark}{a.strip()!r}[/]", e)
    console.print(table)
    summary = Table("", "exact match on held-out")
    summary.add_row(f"base '{BASE}'", f"{result.base_accuracy:.0f}%")
    summary.add_row(f"adapter '{BASE}:{ADAPTER}'", f"{result.adapter_accuracy:.0f}%")
    console.print(summary)
    times = Table("stage", "seconds")
    for name, seconds in result.stages.items():
        times.add_row(name, f"{seconds:.0f}")
    times.add_row("[bold]total", f"[bold]{total_s:.0f}")
    console.print(times)
    same = result.replicas_before == result.replicas_after
    console.print(f"replicas before and after fine-tuning: {', '.join(result.replicas_after)} "
                  f"({'the same: served without a restart' if same else 'CHANGED'})", highlight=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 held-out prompts (what the test runs)")
    parser.add_argument("--port", type=int, default=None)
    opts = parser.parse_args(argv)
    t0 = time.time()
    storage = os.environ.get("HERD_STORAGE", "./.herd/storage")
    console.print(f"[bold]Herd demo[/] (storage root {storage})")
    try:
        result = run_story(QUICK if opts.quick else Recipe(), Path(".herd/demo"), opts.port)
    except RuntimeError as e:
        console.print(f"[red]{e}[/]")
        sys.exit(1)
    print_report(result, time.time() - t0)
    console.print(f"\nany OpenAI client: base_url {result.base_url}, "
                  f"model '{BASE}' or '{BASE}:{ADAPTER}'; the endpoint and the local Ray cluster keep "
                  "running: stop them with `herd cluster down`")


if __name__ == "__main__":
    main()
