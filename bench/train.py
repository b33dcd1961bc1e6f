"""Training benchmark: ZeRO stages on 2 workers, and LoRA speed against transformers + peft.

    python bench/train.py [--steps 8] [--seq-len 128] [--preset small]

Table 1 runs the real recipe (jobs/recipe.py, DeepSpeed, full fine-tuning so that every byte of
model state counts) on 2 local processes over gloo for ZeRO 0/1/2/3 and prints tokens/s and
peak memory per worker next to the ZeRO paper's model-state bytes per worker (fp32 Adam here:
4 bytes params + 4 grads + 8 Adam = 16 Psi unpartitioned). Table 2 trains the same LoRA on the
same weights and batches with Herd's model and with transformers + peft, one process each,
and prints the ratio (target >= 1.0). Numbers are for this machine; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cluster.job_store import JobStore  # noqa: E402
from cluster.models import create_tiny_model, local_model_dir  # noqa: E402
from cluster.storage import open_storage  # noqa: E402
from llama.config import preset  # noqa: E402
from llama.lora import LoraSpec, apply_lora  # noqa: E402
from llama.weights import load_model  # noqa: E402
from train_helpers import make_job, run_recipe  # noqa: E402


def zero_table(workdir: Path, preset_name: str, steps: int, seq_len: int) -> list[dict]:
    url = str(workdir / "storage")
    create_tiny_model(open_storage(url), "base", preset_name)
    psi = preset(preset_name).num_parameters()
    n = 2
    paper = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    fp32 = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}
    rows = []
    for zero in (0, 1, 2, 3):
        job = f"bench-z{zero}"
        make_job(url, job, n_examples=64, zero=zero, workers=n, method="full", adapter=f"full-z{zero}",
                 max_steps=steps, batch_size=4, max_seq_len=seq_len, lr=1e-4, checkpoint_every=10**6,
                 eval_fraction=0.0)
        t0 = time.time()
        run_recipe(url, job, workdir, world=n)
        metrics = JobStore(open_storage(url)).metrics(job)
        timed = metrics[1:] or metrics  # the first step includes warm-up
        rows.append({"zero": zero, "tokens_per_s": sum(m["tokens_per_s"] for m in timed) / len(timed),
                     "peak_mb": max(m["peak_memory_mb"] for m in metrics), "wall_s": time.time() - t0,
                     "paper_mb": paper[zero] / 2**20, "fp32_mb": fp32[zero] / 2**20})
    return rows


def _batches(vocab: int, n: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (batch, seq_len), generator=gen) for _ in range(n)]


def _time_loop(step_fn, batches: list[torch.Tensor], warmup: int = 2) -> float:
    for b in batches[:warmup]:
        step_fn(b)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step_fn(b)
    return sum(b.numel() for b in batches[warmup:]) / (time.perf_counter() - t0)


def lora_table(workdir: Path, preset_name: str, steps: int, seq_len: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    url = str(workdir / "storage")
    model_dir = local_model_dir(open_storage(url), "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    batches = _batches(preset(preset_name).vocab_size, steps + 2, 4, seq_len)

    def make_step(model, forward):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(tokens):
            logits = forward(model, tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours = apply_lora(load_model(model_dir), LoraSpec(r=8, lora_alpha=16, target_modules=targets),
                      trainable_only=True).train()
    herd_tps = _time_loop(make_step(ours, lambda m, t: m(t)), batches)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).train()
    peft_tps = _time_loop(make_step(peft_model, lambda m, t: m(input_ids=t, use_cache=False).logits), batches)
    return {"herd_tokens_per_s": herd_tps, "peft_tokens_per_s": peft_tps, "ratio": herd_tps / peft_tps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        zero = zero_table(workdir, args.preset, args.steps, args.seq_len)
        lora = lora_table(workdir, args.preset, args.steps * 2, args.seq_len)
    if args.json:
        print(json.dumps({"zero": zero, "lora": lora}, indent=2))
        return
    print(f"\nmodel: preset {args.preset} (dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.num_parameters() / 1e6:.1f}M params = Psi), full fine-tuning, 2 workers, fp32, CPU")
    print(f"{'ZeRO':>4} | {'tokens/s (job)':>14} | {'peak RSS/worker MB':>18} | "
          f"{'paper model states MB':>21} | {'fp32 model states MB':>20}")
    print("-" * 90)
    for r in zero:
        print(f"{r['zero']:>4} | {r['tokens_per_s']:>14.0f} | {r['peak_mb']:>18.0f} | {r['paper_mb']:>21.0f} | "
              f"{r['fp32_mb']:>20.0f}")
    print("\npaper (mixed precision, per worker): 0: 16Psi, 1: 4Psi+12Psi/N, 2: 2Psi+14Psi/N, 3: 16Psi/N;"
          " fp32 here: 0: 16Psi, 1: 8Psi+8Psi/N, 2: 4Psi+12Psi/N, 3: 16Psi/N")
    print(f"\nLoRA r=8 on q/k/v/o, batch 4 x {args.seq_len}, one process:")
    print(f"{'implementation':>22} | {'tokens/s':>10}")
    print("-" * 36)
    print(f"{'Herd':>22} | {lora['herd_tokens_per_s']:>10.0f}")
    print(f"{'transformers + peft':>22} | {lora['peft_tokens_per_s']:>10.0f}")
    print(f"{'ratio Herd / peft':>22} | {lora['ratio']:>10.2f}   (target >= 1.0)")


if __name__ == "__main__":
    main()
