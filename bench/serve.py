"""Serving benchmark: Herd's endpoint against transformers' `generate` on the same weights.

    python bench/serve.py [--preset small] [--max-tokens 64] [--requests 4] [--dtypes float32,bfloat16]

Starts its own local Ray cluster, creates a model of the preset shape (random weights, the
same file for both), pushes 16 LoRA adapters, deploys Herd (TP=1, one replica) and measures
over HTTP with streaming clients (asyncio streams in this process, as vLLM's benchmark_serving):
  - decode tokens/s at batch 1 (one client) vs transformers generate at batch 1;
  - aggregate tokens/s with 1/8/32 concurrent clients vs transformers generate run
    sequentially (one request after another);
  - 32 clients spread over 16 different adapters vs 32 clients on the base model;
  - one client with prompt-lookup speculation off (`--speculate-tokens 0`): batch-1 speed on
    text that offers nothing to copy (the random model's output repeats itself a lot).
Each of `--dtypes` is measured on both sides (transformers loads the weights in that dtype; Herd
deploys with `--dtype`), and every Herd figure is compared to transformers in the same dtype.
Greedy decoding everywhere; tokens counted from the API's usage.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from adapters import random_adapter  # noqa: E402
from cluster.models import create_tiny_model, load_config, local_model_dir  # noqa: E402
from cluster.registry import AdapterRegistry  # noqa: E402
from cluster.storage import open_storage  # noqa: E402
from llama.tiny import corpus_lines  # noqa: E402

HERD = str(Path(sys.executable).parent / "herd")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    lines = [line for line in corpus_lines(100_000) if len(line) > 40]
    return [" ".join(line.split()[:8]) for line in lines[:n]]


def hf_tokens_per_s(model_dir: Path, texts: list[str], max_tokens: int, threads: int, dtype: str) -> float:
    from transformers import LlamaForCausalLM
    from llama.tokenizer import Tokenizer
    torch.set_num_threads(threads)
    tok = Tokenizer(model_dir / "tokenizer.model")
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = [torch.tensor([tok.encode(t, bos=True)]) for t in texts]
    hf.generate(ids[0], max_new_tokens=4, do_sample=False)  # warm-up
    total, t0 = 0, time.perf_counter()
    for x in ids:
        out = hf.generate(x, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_id,
                          pad_token_id=0)
        total += out.shape[1] - x.shape[1]
    return total / (time.perf_counter() - t0)


def herd_tokens_per_s(url: str, models: list[str], texts: list[str], clients: int, per_client: int,
                      max_tokens: int) -> float:
    """`clients` concurrent streaming clients, each sending `per_client` requests one after another.

    The clients are asyncio streams in this one process (as vLLM's benchmark_serving does with
    aiohttp): on a 2-core machine 32 client threads, each parsing every chunk into pydantic objects,
    would take the CPU the server is being measured on. The tests use the real openai client.
    """
    import asyncio

    import httpx

    async def run() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=clients + 4)) as http:
            async def client(i: int) -> int:
                tokens = 0
                for k in range(per_client):
                    body = {"model": models[i % len(models)], "prompt": texts[(i * per_client + k) % len(texts)],
                            "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
                    async with http.stream("POST", "/v1/completions", json=body) as resp:
                        if resp.status_code != 200:
                            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
                        async for line in resp.aiter_lines():
                            if line.startswith("data: {") and '"usage"' in line:
                                tokens += json.loads(line[6:])["usage"]["completion_tokens"]
                return tokens
            return sum(await asyncio.gather(*(client(i) for i in range(clients))))

    t0 = time.perf_counter()
    total = asyncio.run(run())
    return total / (time.perf_counter() - t0)


def engine_tokens_per_s(model_dir: Path, dtype: str, texts: list[str], clients: int, per_client: int,
                        max_tokens: int, threads: int) -> float:
    """The engine alone, in this process (no HTTP): what the model side can do, for comparison.

    Call in a fresh process (`--in-process`): set up single-threaded, as a replica is.
    """
    import threading

    from llama.generation import SamplingParams
    from llama.tokenizer import Tokenizer
    from llama.weights import inference_dtype, load_model
    from serving.engine import Engine, FinishEvent, Request
    from serving.runner import LocalRunner
    torch.set_num_threads(1)
    tok = Tokenizer(model_dir / "tokenizer.model")
    model = load_model(model_dir, dtype=inference_dtype(dtype, model_dir))
    engine = Engine(LocalRunner(model, slots=32, max_loras=0, max_lora_rank=8), tok, slots=32, threads=threads)
    counts = [0] * clients

    def one(i: int, text: str) -> None:
        done = threading.Event()

        def emit(ev):
            if isinstance(ev, FinishEvent):
                counts[i] += ev.completion_tokens
                done.set()
        engine.submit(Request(tok.encode(text, bos=True), SamplingParams(max_tokens=max_tokens), emit))
        done.wait()

    one(0, texts[0])  # warm-up
    counts[0] = 0
    workers = [threading.Thread(target=lambda i=i: [one(i, texts[(i * per_client + k) % len(texts)])
                                                    for k in range(per_client)]) for i in range(clients)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    engine.shutdown()
    return sum(counts) / (time.perf_counter() - t0)


def in_process_rows(model_dir: Path, dtype: str, args, texts: list[str]) -> list[tuple[int, float]]:
    out = subprocess.run([sys.executable, __file__, "--in-process", str(model_dir), "--dtypes", dtype,
                          "--threads", str(args.herd_threads), "--max-tokens", str(args.max_tokens),
                          "--requests", str(args.requests)], capture_output=True, text=True, check=True)
    return [(int(c), float(t)) for c, t in (line.split() for line in out.stdout.split("\n") if line.strip())]


def measure_herd(env: dict, args, dtype: str, texts: list[str]) -> tuple[list[tuple[int | str, float]], float]:
    """Deploy Herd in `dtype`, measure 1/8/32 clients on the base, 32 over 16 adapters, and 1 client
    with speculation off ("off"); shut down."""
    port = _port()
    deploy = [HERD, "serve", "deploy", "--model", "bench", "--port", str(port), "--max-batch", "32",
              "--max-loras", "16", "--max-lora-rank", "8", "--threads", str(args.herd_threads),
              "--stream-interval", str(args.stream_interval), "--stream-interval-ms",
              str(args.stream_interval_ms), "--dtype", dtype]
    subprocess.run(deploy, env=env, check=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # Warm-up as the other sides get one: a full-length request, then a full batch of short ones
        # (oneDNN builds its kernels per shape on first use).
        herd_tokens_per_s(endpoint, ["bench"], texts, 1, 1, args.max_tokens)
        herd_tokens_per_s(endpoint, ["bench"], texts, 32, 1, 8)
        rows = [(clients, herd_tokens_per_s(endpoint, ["bench"], texts, clients, args.requests, args.max_tokens))
                for clients in (1, 8, 32)]
        mixed = herd_tokens_per_s(endpoint, [f"bench:ad{i}" for i in range(16)], texts, 32, args.requests,
                                  args.max_tokens)
        # Batch 1 leans on prompt-lookup speculation, which pays on repetitive text; the same
        # deployment with it off is what text with nothing to copy would see.
        subprocess.run(deploy + ["--speculate-tokens", "0"], env=env, check=True, capture_output=True)
        herd_tokens_per_s(endpoint, ["bench"], texts, 1, 1, args.max_tokens)
        rows.append(("off", herd_tokens_per_s(endpoint, ["bench"], texts, 1, args.requests,
                                                             args.max_tokens)))
    finally:
        subprocess.run([HERD, "serve", "shutdown"], env=env, capture_output=True)
    return rows, mixed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both")
    parser.add_argument("--herd-threads", type=int, default=None,
                        help="Herd's engine threads (default: --threads)")
    parser.add_argument("--stream-interval", type=int, default=1, help="Herd's --stream-interval")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0, help="Herd's --stream-interval-ms")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated; each is measured for both Herd and transformers")
    parser.add_argument("--in-process", type=Path, help=argparse.SUPPRESS)  # engine-only child run
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    args.herd_threads = args.herd_threads or args.threads
    if args.in_process:
        for clients in (1, 32):
            print(clients, engine_tokens_per_s(args.in_process, dtypes[0], prompts(64), clients, args.requests,
                                               args.max_tokens, args.threads))
        return
    env = {**os.environ, "HERD_DASHBOARD_PORT": str(_port()), "HERD_GCS_PORT": str(_port())}
    os.environ.update(env)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "storage")
        env["HERD_STORAGE"] = url
        storage = open_storage(url)
        create_tiny_model(storage, "bench", preset_name=args.preset)
        cfg = load_config(storage, "bench")
        reg = AdapterRegistry(storage)
        for i in range(16):
            reg.push(random_adapter(Path(tmp) / f"a{i}", cfg, r=8, alpha=16, targets=("q_proj", "v_proj"),
                                    base="bench", seed=i), f"ad{i}")
        texts = prompts(64)
        model_dir = local_model_dir(storage, "bench")
        try:
            for dtype in dtypes:
                hf = hf_tokens_per_s(model_dir, texts[:args.requests * 2], args.max_tokens, args.threads, dtype)
                results[dtype] = (hf, *measure_herd(env, args, dtype, texts),
                                  in_process_rows(model_dir, dtype, args, texts))
        finally:
            subprocess.run([HERD, "cluster", "down"], env=env, capture_output=True)
    print(f"\nmodel: preset {args.preset} ({cfg.num_parameters() / 1e6:.1f}M params), greedy, "
          f"{args.max_tokens} new tokens, {args.threads} torch threads each, stream interval "
          f"{args.stream_interval} token(s) / {args.stream_interval_ms:g} ms, CPU; each Herd row against transformers in the same dtype")
    print(f"{'setup':>44} | {'tokens/s':>9} | {'vs transformers':>15} | target")
    print("-" * 90)
    for dtype, (hf, rows, mixed, engine_rows) in results.items():
        print(f"{f'transformers generate, sequential, {dtype}':>44} | {hf:>9.1f} | {1.0:>15.2f} |")
        for clients, tps in rows:
            target = {1: ">= 2x (batch 1)", 32: ">= 8x", "off": "(text with nothing to copy)"}.get(clients, "")
            label = f"Herd {dtype}, 1 client, no speculation" if clients == "off" else \
                f"Herd {dtype}, {clients} concurrent client(s)"
            print(f"{label:>44} | {tps:>9.1f} | {tps / hf:>15.2f} | {target}")
        base32 = dict(rows)[32]
        print(f"{f'Herd {dtype}, 32 clients over 16 adapters':>44} | {mixed:>9.1f} | {mixed / hf:>15.2f} | "
              f">= 0.8x of base: {mixed / base32:.2f}x")
        for clients, tps in engine_rows:
            label = f"engine alone {dtype}, {clients} client(s)"
            print(f"{label:>44} | {tps:>9.1f} | {tps / hf:>15.2f} | (no HTTP, for comparison)")


if __name__ == "__main__":
    main()
