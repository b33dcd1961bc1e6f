"""`make demo`: the whole Herd story on this machine, step by step, through the `herd` CLI.

1. create a tiny Llama-shaped model (tokenizer and a short pre-training on the KJV Bible)
2. fine-tune a LoRA adapter with DeepSpeed ZeRO-2 on 2 Ray Train workers (starts a local Ray)
3. the adapter is published to the registry; list it
4. deploy the OpenAI-compatible endpoint on Ray Serve (base + adapters)
5. chat with the base model and with the adapter
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console()
HERD = str(Path(sys.executable).parent / "herd")
WORK = Path(".herd/demo")
QUESTION = "And God said unto Moses"


def herd(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    console.print(f"[dim]$ herd {' '.join(args)}[/]", highlight=False)
    proc = subprocess.run([HERD, *args], text=True, capture_output=capture)
    if check and proc.returncode != 0:
        if capture:
            console.print(proc.stdout + proc.stderr)
        console.print(f"[red]step failed with exit code {proc.returncode}[/]")
        sys.exit(proc.returncode)
    return proc


def step(n: int, title: str) -> None:
    console.rule(f"[bold cyan]{n}. {title}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main() -> None:
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    storage = os.environ.get("HERD_STORAGE", "./.herd/storage")
    console.print(f"[bold]Herd demo[/] (storage root {storage})")

    step(1, "A tiny Llama 2-shaped model, pre-trained for a few seconds on the KJV Bible")
    models = json.loads(herd("models", "list", "--json", capture=True).stdout)
    if not any(m["name"] == "demo" for m in models):
        herd("models", "create-tiny", "--name", "demo", "--train-steps", "400")
    else:
        console.print("model 'demo' already exists")
    herd("generate", "--model", "demo", "--max-tokens", "24", "In the beginning God created")

    step(2, "Fine-tune a LoRA adapter: Ray Train, 2 workers, DeepSpeed ZeRO-2")
    data = WORK / "light.jsonl"
    from llama.tiny import demo_dataset
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_dataset(96)))
    console.print(f"training data: {data} ({sum(1 for _ in data.open())} examples, prompt/completion and chat)")
    herd("finetune", "submit", "--model", "demo", "--data", str(data), "--adapter", "light", "--workers", "2",
         "--zero", "2", "--epochs", "6", "--lr", "1e-2", "--lora-rank", "16", "--lora-alpha", "32",
         "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--checkpoint-every", "20",
         "--promote", "--follow")

    step(3, "The adapter registry")
    herd("adapters", "list")
    herd("adapters", "show", "light")

    step(4, "Serve base + adapters on Ray Serve (OpenAI-compatible API)")
    port = next(p for p in (8000, 8001, 8002, 8080, 8888) if _port_free(p) or p == 8888)
    status = herd("serve", "status", "--json", check=False, capture=True)
    if status.returncode == 0:
        port = int(json.loads(status.stdout)["endpoint"].rsplit(":", 1)[1])
    herd("serve", "deploy", "--model", "demo", "--port", str(port), "--max-loras", "4")

    step(5, "Ask the base model and the fine-tuned adapter the same thing")
    console.print(f"[bold]base model[/] ({QUESTION!r}):")
    herd("chat", "--max-tokens", "24", QUESTION)
    console.print(f"[bold]adapter 'light'[/] ({QUESTION!r}):")
    herd("chat", "--adapter", "light", "--max-tokens", "24", QUESTION)
    console.print(f"\nor with any OpenAI client: base_url http://127.0.0.1:{port}/v1, model 'demo' or 'demo:light'")
    console.rule(f"[bold green]done in {time.time() - t0:.0f}s")
    console.print("the endpoint and the local Ray cluster keep running; stop them with `herd cluster down`")


if __name__ == "__main__":
    main()
