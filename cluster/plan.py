"""`herd plan`: the hardware a model needs for serving and for fine-tuning, before it is rented.

Everything here is arithmetic on the model's shape (llama/config.py), in bytes; GB = 1e9.

Serving (bf16 weights and KV cache, Herd's tensor parallelism):
- weights: 2 bytes per parameter;
- KV cache: 2 (K and V) * layers * kv_heads * head_dim * 2 bytes per token (70B: 0.31 MiB);
- a TP=t shard holds 1/t of every layer's linear weights plus the embeddings, output head and
  norms whole (llama/tensor_parallel.py replicates them), and 1/t of the KV heads;
- t must divide the heads, the KV heads and the MLP size and fit in one node (STRICT_PACK); the
  smallest t whose shard + the KV of C sequences of L tokens fits in `utilization` of a GPU wins.

Fine-tuning (mixed precision Adam on GPUs):
- model state per GPU per ZeRO stage: `cluster/memory_formula.py`'s `zero_model_state`, the
  function the fine-tuning bench also uses (16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N);
- LoRA: the frozen bf16 base (2Ψ, split over N with ZeRO-3) plus the adapter's own model state;
- activations per GPU for a micro-batch b of L tokens (Korthikanti et al. 2022 with flash
  attention, no L² scores kept): 34·L·b·dim bytes per layer without activation checkpointing;
  with it, each layer's bf16 input (2·L·b·dim) plus one layer recomputed at a time; plus the
  fp32 logits (4·L·b·vocab).
"""

from __future__ import annotations

import json
import shlex

from pydantic import BaseModel

from cluster.memory_formula import zero_model_state
from llama.config import LlamaConfig, preset

GB = 1e9
GIB = 2**30
ALIASES = {"7b": "llama2-7b", "13b": "llama2-13b", "70b": "llama2-70b"}
BF16 = 2


class PlanInput(BaseModel):
    model: str = "7b"
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    max_concurrent: int = 32
    context: int | None = None  # default: the model's max_seq_len
    method: str = "lora"
    zero: int = 2
    offload: bool = False
    gpus: int | None = None  # fine-tuning table at this many GPUs (default: one node)
    micro_batch: int = 1
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    utilization: float = 0.9
    max_gpus: int = 1024


def resolve_config(model: str, storage=None) -> LlamaConfig:
    """7b/13b/70b, a preset name, or a model stored in the storage root."""
    name = ALIASES.get(model.lower(), model)
    try:
        return preset(name)
    except ValueError:
        if storage is None:
            raise
    from cluster.models import load_config
    return load_config(storage, model)


# ---- shapes -------------------------------------------------------------------------------------

def layer_linear_params(cfg: LlamaConfig) -> int:
    kv = cfg.n_kv_heads * cfg.head_dim
    return cfg.n_layers * (2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.intermediate_size)


def replicated_params(cfg: LlamaConfig) -> int:
    """Embeddings, output head and norms: every TP rank holds them whole."""
    return 2 * cfg.vocab_size * cfg.dim + (2 * cfg.n_layers + 1) * cfg.dim


def weight_bytes(cfg: LlamaConfig) -> int:
    return BF16 * cfg.num_parameters()


def kv_bytes_per_token(cfg: LlamaConfig) -> int:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * BF16


def tp_shard_bytes(cfg: LlamaConfig, tp: int) -> float:
    return BF16 * (layer_linear_params(cfg) / tp + replicated_params(cfg))


def tp_degrees(cfg: LlamaConfig, limit: int) -> list[int]:
    return [t for t in range(1, limit + 1)
            if cfg.n_heads % t == 0 and cfg.n_kv_heads % t == 0 and cfg.intermediate_size % t == 0]


def lora_params(cfg: LlamaConfig, rank: int, targets: tuple[str, ...]) -> int:
    kv = cfg.n_kv_heads * cfg.head_dim
    shapes = {"q_proj": (cfg.dim, cfg.dim), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv),
              "o_proj": (cfg.dim, cfg.dim), "gate_proj": (cfg.dim, cfg.intermediate_size),
              "up_proj": (cfg.dim, cfg.intermediate_size), "down_proj": (cfg.intermediate_size, cfg.dim)}
    return cfg.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def activation_bytes(cfg: LlamaConfig, seq: int, micro_batch: int, checkpointing: bool) -> float:
    tokens = seq * micro_batch
    per_layer = 34 * tokens * cfg.dim
    logits = 4 * tokens * cfg.vocab_size
    if checkpointing:
        return cfg.n_layers * BF16 * tokens * cfg.dim + per_layer + logits
    return cfg.n_layers * per_layer + logits


# ---- the two tables ---------------------------------------------------------------------------

def serving_plan(cfg: LlamaConfig, p: PlanInput, model_name: str) -> dict:
    context = p.context or cfg.max_seq_len
    usable = p.gpu_memory_gib * GIB * p.utilization
    kv_total = p.max_concurrent * context * kv_bytes_per_token(cfg)
    rows = []
    for t in tp_degrees(cfg, p.gpus_per_node):
        shard, kv = tp_shard_bytes(cfg, t), kv_total / t
        rows.append({"tp": t, "shard_gb": shard / GB, "kv_gb": kv / GB, "per_gpu_gb": (shard + kv) / GB,
                     "fits": shard + kv <= usable, "replicas_per_node": p.gpus_per_node // t})
    best = next((r for r in rows if r["fits"]), None)
    out = {"weights_gb": weight_bytes(cfg) / GB, "kv_bytes_per_token": kv_bytes_per_token(cfg),
           "kv_mib_per_token": kv_bytes_per_token(cfg) / 2**20, "context": context,
           "max_concurrent": p.max_concurrent, "kv_total_gb": kv_total / GB, "usable_gb_per_gpu": usable / GB,
           "options": rows, "tp": best and best["tp"], "replicas_per_node": best and best["replicas_per_node"],
           "command": None}
    if best:
        out["command"] = shlex.join(["herd", "serve", "deploy", "--model", model_name, "--tp", str(best["tp"]),
                                     "--device", "cuda", "--max-batch", str(p.max_concurrent), "--max-seq-len",
                                     str(context), "--gpu-memory-utilization", str(p.utilization)])
    return out


def finetune_memory(cfg: LlamaConfig, p: PlanInput, gpus: int, stage: int, offload: bool,
                    checkpointing: bool = True) -> dict:
    """Per-GPU bytes of one fine-tuning worker at `gpus` data-parallel GPUs."""
    seq = p.context or 512
    params = cfg.num_parameters()
    if p.method == "full":
        state = zero_model_state(params, stage, gpus, mixed_precision=True, offload_optimizer=offload)
        frozen = 0.0
    else:
        state = zero_model_state(lora_params(cfg, p.lora_rank, p.lora_targets), stage, gpus, mixed_precision=True,
                                 offload_optimizer=offload)
        frozen = BF16 * params / (gpus if stage >= 3 else 1)
    act = activation_bytes(cfg, seq, p.micro_batch, checkpointing)
    device = state.device_bytes + frozen + act
    return {"gpus": gpus, "zero": stage, "offload": offload, "model_state_gb": state.device_bytes / GB,
            "frozen_base_gb": frozen / GB, "activations_gb": act / GB, "per_gpu_gb": device / GB,
            "host_gb": state.host_bytes / GB,
            "fits": device <= p.gpu_memory_gib * GIB * p.utilization}


def gpu_counts(per_node: int, limit: int) -> list[int]:
    """Data-parallel sizes worth renting: powers of two within a node, then whole nodes."""
    within = [n for n in (1, 2, 4, 8, 16, 32) if n < per_node]
    return within + list(range(per_node, limit + 1, per_node))


def finetune_plan(cfg: LlamaConfig, p: PlanInput, model_name: str) -> dict:
    gpus = p.gpus or p.gpus_per_node
    seq = p.context or 512
    stages = [finetune_memory(cfg, p, gpus, s, off) for s in range(4) for off in (False, True)]
    smallest = next((n for n in gpu_counts(p.gpus_per_node, p.max_gpus)
                     if finetune_memory(cfg, p, n, p.zero, p.offload)["fits"]), None)
    out = {"method": p.method, "parameters": cfg.num_parameters(), "gpus": gpus, "context": seq,
           "micro_batch": p.micro_batch, "zero": p.zero, "offload": p.offload, "stages": stages,
           "activations_gb": {"checkpointing": activation_bytes(cfg, seq, p.micro_batch, True) / GB,
                              "no_checkpointing": activation_bytes(cfg, seq, p.micro_batch, False) / GB},
           "smallest_gpus": smallest, "command": None}
    if p.method == "lora":
        out["lora_params"] = lora_params(cfg, p.lora_rank, p.lora_targets)
    if smallest:
        argv = ["herd", "finetune", "submit", "--model", model_name, "--data", "DATA.jsonl", "--adapter", "NAME",
                "--method", p.method, "--zero", str(p.zero), "--workers", str(smallest), "--gpu",
                "--max-seq-len", str(seq), "--batch-size", str(p.micro_batch)]
        if p.method == "lora":
            argv += ["--lora-rank", str(p.lora_rank)]
        out["command"] = shlex.join(argv + (["--offload"] if p.offload else []))
    return out


def plan(p: PlanInput, storage=None) -> dict:
    cfg = resolve_config(p.model, storage)
    if p.method not in ("lora", "full"):
        raise ValueError(f"--method must be lora or full, got {p.method!r}")
    return {"model": p.model, "shape": json.loads(cfg.model_dump_json()),
            "gpu_memory_gib": p.gpu_memory_gib, "gpus_per_node": p.gpus_per_node,
            "serving": serving_plan(cfg, p, p.model), "finetune": finetune_plan(cfg, p, p.model)}
