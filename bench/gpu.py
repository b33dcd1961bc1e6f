"""GPU serving benchmark, without Ray: Herd's engine against the memory-bandwidth limit and transformers.

    python bench/gpu.py                                   # 7B shape, bf16, on the GPU (~3-5 min)
    python bench/gpu.py --device cpu --preset tiny        # the same script on CPU, for a check

One process, one random bf16 model (Llama-2-7B's shape by default) shared by every row. The
workload of every row: 32-token prompts, 128 new tokens, greedy, EOS ignored. Rows:

- the measured device copy bandwidth (read + write of a large buffer) and the batch-1 limit it
  implies: bandwidth / bytes of weights = the most decode steps per second any engine can reach;
- transformers `generate` on the same weights at batch 1 and a static batch of 64;
- Herd's engine (serving/engine.py with the runner's CUDA graphs and paged KV cache) at batch 1
  with speculation off, 8/32/64 concurrent requests, and 64 concurrent over 16 LoRA adapters;
- time to first token, the KV pool it allocated, the compile/capture time.

Batch-1 decode is judged against the bandwidth limit (target >= 70%); 64 concurrent against
the roofline of that batch (weights + the KV read per step, over the bandwidth; target >= 35%)
and transformers' static batch (target >= 6x); adapters against base (target >= 0.9x). It
prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.config import LlamaConfig, preset  # noqa: E402
from llama.generation import SamplingParams  # noqa: E402
from llama.lora import LoraSpec, peft_key  # noqa: E402
from llama.model import Transformer, random_model  # noqa: E402
from llama.paged_cache import kv_bytes_per_token  # noqa: E402
from llama.weights import herd_to_hf_name  # noqa: E402

PROMPT, NEW = 32, 128


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes moved per second (read + write) by a large device copy, best of 5."""
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 2 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_twin(model: Transformer, cfg: LlamaConfig):
    """transformers' LlamaForCausalLM holding the very same tensors (no copy of the weights)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    hf_cfg = HFConfig(**cfg.to_hf_dict())
    param = next(model.parameters())
    with torch.device(param.device):
        hf = LlamaForCausalLM(hf_cfg).to(param.dtype)
    state = {herd_to_hf_name(k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, assign=True, strict=False)  # our tensors replace its own
    return hf.eval()


def hf_tokens_per_s(hf, prompts: torch.Tensor, device: torch.device) -> float:
    with torch.inference_mode():
        hf.generate(prompts[:, :8], max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(prompts, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        sync(device)
    return (out.shape[1] - prompts.shape[1]) * prompts.shape[0] / (time.perf_counter() - t0)


class ModuloTokenizer:
    """The repo's tokenizer (1,000 pieces) decoding a 32,000-token vocabulary modulo its size: the
    detokenizer does real sentencepiece work per token, as it would with Llama's tokenizer."""

    def __init__(self, tok):
        self.tok, self.eos_id, self.bos_id = tok, tok.eos_id, tok.bos_id

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i % self.tok.n_words for i in ids])


def random_adapters(cfg: LlamaConfig, n: int, r: int, device: torch.device, dtype: torch.dtype):
    spec = LoraSpec(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = []
    for i in range(n):
        gen = torch.Generator(device=device).manual_seed(100 + i)
        state = {}
        for layer in range(cfg.n_layers):
            for t, (fin, fout) in {"q_proj": (cfg.dim, cfg.dim), "k_proj": (cfg.dim, cfg.n_kv_heads * cfg.head_dim),
                                   "v_proj": (cfg.dim, cfg.n_kv_heads * cfg.head_dim),
                                   "o_proj": (cfg.dim, cfg.dim)}.items():
                path = f"layers.{layer}.{'attention.w' + t[0] if t != 'o_proj' else 'attention.wo'}"
                state[peft_key(path, "A")] = torch.randn(r, fin, generator=gen, device=device, dtype=dtype) * 0.01
                state[peft_key(path, "B")] = torch.randn(fout, r, generator=gen, device=device, dtype=dtype) * 0.01
        out.append((spec, state))
    return out


def herd_run(engine, prompts: list[list[int]], adapters: list | None = None) -> dict:
    from serving.engine import ErrorEvent, FinishEvent, Request
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    queues = []
    t0 = time.perf_counter()
    reqs = []
    for i, p in enumerate(prompts):
        q = queue.Queue()
        adapter = (f"a{i % len(adapters)}", "v1") if adapters else None
        reqs.append(engine.submit(Request(p, params, q.put, adapter=adapter)))
        queues.append(q)
    tokens = 0
    for q in queues:
        while True:
            ev = q.get(timeout=600)
            if isinstance(ev, ErrorEvent):
                raise RuntimeError(ev.message)
            if isinstance(ev, FinishEvent):
                tokens += ev.completion_tokens
                break
    wall = time.perf_counter() - t0
    decode = [(NEW - 1) / (r.last_token_at - r.first_token_at) for r in reqs]
    return {"tokens_per_s": tokens / wall, "decode_tokens_per_s_per_request": sum(decode) / len(decode),
            "ttft_s": sum(r.first_token_at - r.submitted for r in reqs) / len(reqs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--out", default="bench-gpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    from llama.tiny import train_tokenizer
    from llama.tokenizer import Tokenizer
    from serving.engine import Engine
    from serving.kv_blocks import plan_num_blocks
    from serving.runner import LocalRunner

    cfg = preset(args.preset).model_copy(update={"max_seq_len": 4096 if device.type == "cuda" else 512})
    dtype = torch.bfloat16
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "preset": args.preset, "torch": torch.__version__, "prompt": PROMPT, "new_tokens": NEW}
    t0 = time.perf_counter()
    bw = copy_bandwidth(device, args.copy_gib if device.type == "cuda" else 0.25)
    model = random_model(cfg, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res.update(copy_bandwidth_gb_s=bw / 1e9, weight_gb=weight_bytes / 1e9,
               batch1_limit_tokens_per_s=bw / weight_bytes, setup_s=time.perf_counter() - t0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (args.max_batch, PROMPT), generator=gen)

    if not args.skip_hf:
        hf = hf_twin(model, cfg)
        res["hf_batch1_tokens_per_s"] = hf_tokens_per_s(hf, prompts[:1].to(device), device)
        res["hf_static_tokens_per_s"] = hf_tokens_per_s(hf, prompts.to(device), device)
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the KV pool is sized from what the driver reports free

    tok_dir = Path.home() / ".cache" / "herd" / "bench"
    tok = ModuloTokenizer(Tokenizer(train_tokenizer(tok_dir / "tokenizer.model")))
    adapters = random_adapters(cfg, args.adapters, args.lora_rank, device, dtype)
    blocks = plan_num_blocks(cfg, dtype, device, 16, args.max_batch, cfg.max_seq_len, gpu_memory_utilization=0.9)
    t0 = time.perf_counter()
    runner = LocalRunner(model, slots=args.max_batch, max_loras=args.adapters, max_lora_rank=args.lora_rank,
                         max_seq_len=cfg.max_seq_len, num_blocks=blocks)
    engine = Engine(runner, tok, slots=args.max_batch, max_loras=args.adapters, speculate_tokens=0,
                    adapter_loader=lambda key: adapters[int(key[0][1:])], prefill_wait_s=0.0)
    rows = [p.tolist() for p in prompts]
    herd_run(engine, rows[:1])  # warm-up: kernels, graphs of the small buckets
    herd_run(engine, rows)  # ... and the large ones
    herd_run(engine, rows, adapters=adapters)  # ... with LoRA
    res.update(kv_cache_gib=runner.cache.bytes / (1 << 30), kv_blocks=blocks,
               warmup_s=time.perf_counter() - t0, capture_s=runner.stats["capture_s"])
    for n in sorted({1, 8, 32, 64, args.max_batch}):
        if n <= args.max_batch:
            res[f"herd_{n}"] = herd_run(engine, rows[:n])
    res["herd_full"] = res[f"herd_{args.max_batch}"]
    res["herd_full_adapters"] = herd_run(engine, rows, adapters=adapters)
    res["graph_steps"], res["eager_steps"] = runner.stats["graph_steps"], runner.stats["eager_steps"]
    engine.shutdown()

    kv_per_step = args.max_batch * (PROMPT + NEW / 2) * kv_bytes_per_token(cfg, dtype)
    roofline64 = args.max_batch * bw / (weight_bytes + kv_per_step)
    b1 = res["herd_1"]["decode_tokens_per_s_per_request"]
    res["ratios"] = {
        "batch1_vs_bandwidth_limit": b1 / res["batch1_limit_tokens_per_s"],
        "full_batch_vs_roofline": res["herd_full"]["tokens_per_s"] / roofline64,
        "adapters_vs_base": res["herd_full_adapters"]["tokens_per_s"] / res["herd_full"]["tokens_per_s"],
    }
    if "hf_static_tokens_per_s" in res:
        res["ratios"]["full_batch_vs_hf_static"] = res["herd_full"]["tokens_per_s"] / res["hf_static_tokens_per_s"]
    res["max_batch"], res["n_adapters"] = args.max_batch, args.adapters
    Path(args.out).write_text(json.dumps(res, indent=2))
    print_table(res, roofline64)


def print_table(res: dict, roofline: float) -> None:
    r, n, a = res["ratios"], res["max_batch"], res["n_adapters"]
    print(f"{res['device']}, {res['preset']} bf16 ({res['weight_gb']:.2f} GB of weights), "
          f"{res['prompt']}-token prompts, {res['new_tokens']} new tokens, greedy, EOS ignored")
    print(f"copy bandwidth {res['copy_bandwidth_gb_s']:.0f} GB/s -> batch-1 limit "
          f"{res['batch1_limit_tokens_per_s']:.1f} tokens/s; {n}-row roofline {roofline:.0f} tokens/s")
    print(f"{'row':>40} | {'tokens/s':>9} | {'TTFT ms':>8} | target")
    print("-" * 100)
    if "hf_batch1_tokens_per_s" in res:
        print(f"{'transformers generate, batch 1':>40} | {res['hf_batch1_tokens_per_s']:9.1f} | {'':>8} |")
        print(f"{f'transformers generate, static batch {n}':>40} | {res['hf_static_tokens_per_s']:9.1f} | {'':>8} |")
    hf = f", {r['full_batch_vs_hf_static']:.1f}x transformers (>= 6x)" if "full_batch_vs_hf_static" in r else ""
    rows = [("herd_1", "Herd, 1 request (decode rate)", f"{r['batch1_vs_bandwidth_limit']:.0%} of limit (>= 70%)")]
    rows += [(f"herd_{k}", f"Herd, {k} concurrent", "") for k in (8, 32, 64) if k < n]
    rows += [("herd_full", f"Herd, {n} concurrent", f"{r['full_batch_vs_roofline']:.0%} of roofline (>= 35%){hf}"),
             ("herd_full_adapters", f"Herd, {n} over {a} adapters", f"{r['adapters_vs_base']:.2f}x base (>= 0.9x)")]
    for key, label, target in rows:
        row = res[key]
        value = row["decode_tokens_per_s_per_request"] if key == "herd_1" else row["tokens_per_s"]
        print(f"{label:>40} | {value:9.1f} | {row['ttft_s'] * 1000:8.1f} | {target}")
    print(f"KV pool {res['kv_cache_gib']:.2f} GiB ({res['kv_blocks']} blocks), warm-up {res['warmup_s']:.1f} s "
          f"(graph capture {res['capture_s']:.1f} s), steps: {res['graph_steps']} graph / {res['eager_steps']} eager")


if __name__ == "__main__":
    main()
