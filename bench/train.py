"""Training benchmark: memory per ZeRO stage on CPU, and speed and MFU on a GPU.

    python bench/train.py                           # CPU: ZeRO 0-3, 2 workers, a 208M-parameter model
    python bench/train.py --device cuda             # GPU: bf16 matmul rate, LoRA on the Llama-2-7B shape
                                                    # (Herd vs transformers + peft), ZeRO-3 on a ~1B shape
    python bench/train.py --device cpu --preset tiny   # the GPU script's whole path, tiny, on CPU

Memory (default): the real recipe (jobs/recipe.py, DeepSpeed, full fine-tuning so every byte of
model state counts) on 2 local processes over gloo for ZeRO 0/1/2/3. For each stage it prints each
worker's peak RSS beside what it should be: the model-state formula (cluster/memory_formula.py,
fp32 Adam: 16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N) plus the fixed runtime memory (peak RSS of the same job
on a 0.2M-parameter model) plus the activations (measured: RSS growth over one forward of the
same batch). Targets: ZeRO-3 <= 0.65x ZeRO-0, and each stage within 25% of its expectation.

Speed (`--device`): MFU = model FLOPs per token (6Ψ full fine-tuning, 4Ψ LoRA: no weight
gradients) x tokens/s / the dense matmul rate measured in the same run (an 8192^3 bf16 product
on a GPU). Numbers are for the machine they ran on; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cluster.job_store import JobStore  # noqa: E402
from cluster.memory_formula import zero_model_state  # noqa: E402
from cluster.models import create_tiny_model, import_model  # noqa: E402
from cluster.storage import open_storage  # noqa: E402
from llama.config import LlamaConfig, preset  # noqa: E402
from llama.tiny import create_tiny  # noqa: E402

BENCH_200M = LlamaConfig(dim=1024, n_layers=16, n_heads=16, n_kv_heads=16, vocab_size=1000,
                         intermediate_size=2816, max_seq_len=1024)
SHAPE_1B = LlamaConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, vocab_size=32000,
                       intermediate_size=5632, max_seq_len=2048)
MB = 2**20


# ---- memory per ZeRO stage (CPU) -------------------------------------------------------------

def _store_model(url: str, name: str, cfg: LlamaConfig) -> None:
    with tempfile.TemporaryDirectory() as d:
        create_tiny(d, cfg=cfg)
        import_model(open_storage(url), d, name)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def activation_mb(cfg: LlamaConfig, batch: int, seq_len: int) -> float:
    """RSS growth over one training forward (what backward keeps), on random weights."""
    from llama.model import Transformer
    model = Transformer(cfg)
    tokens = torch.randint(3, cfg.vocab_size, (batch, seq_len))
    before = _rss_mb()
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    grown = _rss_mb() - before
    del loss, logits, model
    return grown


def zero_table(workdir: Path, cfg: LlamaConfig, steps: int, seq_len: int, batch: int,
               stages: tuple[int, ...] = (3, 2, 1, 0)) -> dict:
    from train_helpers import make_job, run_recipe
    url = str(workdir / "storage")
    storage = open_storage(url)
    create_tiny_model(storage, "base")  # tokenizer + the fixed-memory job's model
    _store_model(url, "bench", cfg)
    psi = cfg.num_parameters()
    n = 2
    common = dict(workers=n, method="full", max_steps=steps, batch_size=batch, max_seq_len=seq_len, lr=1e-4,
                  eval_fraction=0.0, dry_run=True, pack=True)
    make_job(url, "fixed", n_examples=64, zero=0, model="base", adapter="fixed", **common)
    run_recipe(url, "fixed", workdir, world=n)
    fixed = max(max(m["peak_memory_mb_per_worker"]) for m in JobStore(storage).metrics("fixed"))
    act = activation_mb(cfg, batch, seq_len)
    rows = []
    for zero in stages:  # smallest first: on a crowded machine ZeRO-0 is the one that may not fit
        job = f"bench-z{zero}"
        make_job(url, job, n_examples=64, zero=zero, model="bench", adapter=f"full-z{zero}", **common)
        t0 = time.time()
        try:
            run_recipe(url, job, workdir, world=n)
        except Exception as e:  # noqa: BLE001 - e.g. a worker killed for memory: say so in the table
            print(f"ZeRO-{zero} failed: {e}", file=sys.stderr, flush=True)
            continue
        metrics = JobStore(storage).metrics(job)
        timed = metrics[1:] or metrics  # the first step includes warm-up
        per_worker = [max(m["peak_memory_mb_per_worker"][w] for m in metrics) for w in range(n)]
        states = zero_model_state(psi, zero, n, mixed_precision=False).total_bytes / MB
        rows.append({"zero": zero, "tokens_per_s": sum(m["tokens_per_s"] for m in timed) / len(timed),
                     "peak_mb_per_worker": per_worker, "model_states_mb": states,
                     "expected_mb": states + fixed + act, "wall_s": time.time() - t0})
    return {"params": psi, "fixed_mb": fixed, "activations_mb": act, "rows": sorted(rows, key=lambda r: r["zero"])}


def print_zero_table(t: dict, cfg: LlamaConfig, seq_len: int, batch: int) -> bool:
    print(f"\nmodel: dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}: {t['params'] / 1e6:.1f}M "
          f"params (Psi); full fine-tuning, fp32 Adam, 2 workers on CPU, batch {batch} x {seq_len} packed")
    print(f"fixed runtime memory {t['fixed_mb']:.0f} MB/worker (same job, 0.2M-param model); "
          f"activations {t['activations_mb']:.0f} MB (measured forward)")
    print(f"{'ZeRO':>4} | {'tokens/s':>8} | {'peak RSS/worker MB':>20} | {'model states MB':>15} | "
          f"{'expected MB':>11} | {'measured/expected':>17}")
    print("-" * 92)
    ok = True
    for r in t["rows"]:
        peak = max(r["peak_mb_per_worker"])
        ratio = peak / r["expected_mb"]
        ok &= abs(ratio - 1) <= 0.25
        workers = " / ".join(f"{x:.0f}" for x in r["peak_mb_per_worker"])
        print(f"{r['zero']:>4} | {r['tokens_per_s']:>8.0f} | {workers:>20} | {r['model_states_mb']:>15.0f} | "
              f"{r['expected_mb']:>11.0f} | {ratio:>17.2f}")
    peaks = {r["zero"]: max(r["peak_mb_per_worker"]) for r in t["rows"]}
    if not t["rows"]:
        return False
    ratio = peaks[3] / peaks[0] if 0 in peaks and 3 in peaks else float("nan")
    ok &= len(peaks) == 4
    print(f"\nZeRO-3 / ZeRO-0 peak RSS per worker: {ratio:.2f} (target <= 0.65); "
          f"every stage ran and is within 25% of formula + fixed + activations: {'yes' if ok else 'NO'}")
    print("model states per worker (cluster/memory_formula.py): fp32 0: 16Psi, 1: 8Psi+8Psi/N, 2: 4Psi+12Psi/N, "
          "3: 16Psi/N; mixed precision (GPU) 16Psi, 4Psi+12Psi/N, 2Psi+14Psi/N, 16Psi/N")
    return ok and ratio <= 0.65


# ---- speed and MFU (--device) ----------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """Dense matmul FLOP/s for an n^3 product (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _random_model(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype):
    from llama.model import random_model
    return random_model(cfg, device, dtype).train()


def _time_steps(step, batches: list[torch.Tensor], device: torch.device, warmup: int = 2) -> float:
    for b in batches[:warmup]:
        step(b)
    _sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    _sync(device)
    return sum(b.numel() for b in batches[warmup:]) / (time.perf_counter() - t0)


def lora_speed(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, batch: int, seq_len: int,
               steps: int, rank: int = 16) -> dict:
    """LoRA (q/k/v/o) training steps: Herd's model + apply_lora vs transformers + peft, same weights."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from llama.lora import LoraSpec, apply_lora
    from llama.weights import state_dict_to_hf
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=gen).to(device) for _ in range(steps + 2)]

    def make_step(model, forward):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(tokens):
            logits = forward(model, tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours = _random_model(cfg, device, dtype)
    hf_state = state_dict_to_hf(ours.state_dict())
    apply_lora(ours, LoraSpec(r=rank, lora_alpha=2 * rank, target_modules=targets), trainable_only=True).train()
    herd_tps = _time_steps(make_step(ours, lambda m, t: m(t)), batches, device)
    del ours
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    hf.load_state_dict(hf_state)
    del hf_state
    peft_model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)).train()
    peft_tps = _time_steps(make_step(peft_model, lambda m, t: m(input_ids=t, use_cache=False).logits), batches, device)
    return {"herd_tokens_per_s": herd_tps, "peft_tokens_per_s": peft_tps, "params": cfg.num_parameters()}


def zero3_speed(workdir: Path, cfg: LlamaConfig, use_gpu: bool, steps: int, seq_len: int, batch: int) -> dict:
    """A real ZeRO-3 full fine-tune through the recipe in one process (jobs.local, no Ray)."""
    from jobs.local import run_local
    from train_helpers import make_job
    url = str(workdir / "z3storage")
    storage = open_storage(url)
    create_tiny_model(storage, "base")
    _store_model(url, "shape", cfg)
    make_job(url, "z3", n_examples=400, model="shape", method="full", zero=3, workers=1, max_steps=steps,
             batch_size=batch, max_seq_len=seq_len, lr=1e-5, eval_fraction=0.0, dry_run=True, pack=True,
             use_gpu=use_gpu, warmup_steps=0)
    result = run_local("z3", url)
    metrics = JobStore(storage).metrics("z3")
    timed = metrics[1:] or metrics
    return {"losses": result.losses, "tokens_per_s": sum(m["tokens_per_s"] for m in timed) / len(timed),
            "peak_memory_mb": max(m["peak_memory_mb"] for m in metrics), "params": cfg.num_parameters()}


def device_bench(args) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    lora_cfg = preset(args.preset or ("llama2-7b" if gpu else "tiny"))
    full_cfg = preset(args.preset) if args.preset else (SHAPE_1B if gpu else preset("tiny"))
    rate = matmul_rate(device, 8192 if gpu else 512, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        lora = lora_speed(lora_cfg, device, dtype, batch=4, seq_len=512 if gpu else 64, steps=args.steps)
        if gpu:
            torch.cuda.empty_cache()
        full = zero3_speed(Path(tmp), full_cfg, gpu, steps=args.steps, seq_len=512 if gpu else 128, batch=4)
    out = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "matmul_flops": rate,
           "lora": lora, "zero3": full}
    lora["herd_mfu"] = 4 * lora["params"] * lora["herd_tokens_per_s"] / rate
    lora["peft_mfu"] = 4 * lora["params"] * lora["peft_tokens_per_s"] / rate
    full["mfu"] = 6 * full["params"] * full["tokens_per_s"] / rate
    return out


def print_device(r: dict) -> None:
    lora, full = r["lora"], r["zero3"]
    print(f"\ndevice: {r['device']}; dense matmul rate {r['matmul_flops'] / 1e9:.0f} GFLOP/s")
    print(f"LoRA r=16 q/k/v/o, {lora['params'] / 1e6:.1f}M params, batch 4:")
    print(f"{'implementation':>22} | {'tokens/s':>10} | {'MFU (4Psi)':>10}")
    print(f"{'Herd':>22} | {lora['herd_tokens_per_s']:>10.0f} | {100 * lora['herd_mfu']:>9.1f}%")
    print(f"{'transformers + peft':>22} | {lora['peft_tokens_per_s']:>10.0f} | {100 * lora['peft_mfu']:>9.1f}%")
    print(f"{'ratio Herd / peft':>22} | {lora['herd_tokens_per_s'] / lora['peft_tokens_per_s']:>10.2f}   "
          "(targets: >= 1.0, MFU >= 40%)")
    print(f"ZeRO-3 full fine-tune (recipe, one process), {full['params'] / 1e6:.1f}M params: "
          f"{full['tokens_per_s']:.0f} tokens/s, MFU (6Psi) {100 * full['mfu']:.1f}%, peak {full['peak_memory_mb']:.0f} MB")
    print("  losses: " + ", ".join(f"{x:.4f}" for x in full["losses"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="speed/MFU mode on this device (default: the CPU memory table)")
    parser.add_argument("--preset", default=None, help="model shape for --device (default: 7B/1B on cuda, tiny on cpu)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--stages", default="3,2,1,0", help="ZeRO stages of the memory table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.device:
        args.steps = args.steps or 5
        result = device_bench(args)
        print(json.dumps(result, indent=2) if args.json else "", end="")
        if not args.json:
            print_device(result)
        return
    args.steps = args.steps or 3
    with tempfile.TemporaryDirectory() as tmp:
        table = zero_table(Path(tmp), BENCH_200M, args.steps, args.seq_len, args.batch,
                           tuple(int(z) for z in args.stages.split(",")))
    if args.json:
        print(json.dumps(table, indent=2))
        return
    met = print_zero_table(table, BENCH_200M, args.seq_len, args.batch)
    print(f"peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
