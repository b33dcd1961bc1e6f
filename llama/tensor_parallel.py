"""Megatron-style tensor parallelism for the Llama model (torch.distributed only).

Rank r of N holds:
  - column-parallel wq/wk/wv (its heads) and w1/w3 (its slice of the hidden size): rows r/N;
  - row-parallel wo/w2: the matching input columns, followed by an all-reduce;
  - embeddings, norms and the output head whole (small next to the layers).
Attention needs no communication: each rank attends with its own heads and its own KV cache.
Weights are read slice by slice from the safetensors files, so no rank ever holds a full layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from llama.config import LlamaConfig
from llama.model import Transformer
from llama.weights import INDEX_FILE, SINGLE_FILE, herd_to_hf_name

COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW = ("attention.wo", "feed_forward.w2")


class AllReduce(nn.Module):
    """Sum a row-parallel layer's partial outputs across the tensor-parallel group."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner = inner
        self.group = group

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y


def check_divisible(cfg: LlamaConfig, world: int) -> None:
    for what, n in (("heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                    ("intermediate size", cfg.intermediate_size)):
        if n % world:
            raise ValueError(f"tensor parallel degree {world} does not divide the model's {n} {what}")


def _tensor_files(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    return {}


def load_shard(directory: str | Path, rank: int, world: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Transformer:
    """This rank's shard of a stored HF-layout model, row-parallel layers wrapped in AllReduce.

    Each slice goes to `device` in `dtype` as it is read: a rank's GPU gets its shard without a
    host copy of more than one tensor.

    Call `attach_multi_lora` on the result before `wrap_row_parallel` if adapters are needed.
    """
    directory = Path(directory)
    cfg = LlamaConfig.load(directory / "config.json")
    check_divisible(cfg, world)
    with torch.device("meta"):
        model = Transformer(cfg)
    mods = dict(model.named_modules())
    for i in range(cfg.n_layers):
        for name in COLUMN + ROW:
            full = mods[f"layers.{i}.{name}"]
            parent, attr = f"layers.{i}.{name}".rsplit(".", 1)
            if name in COLUMN:
                shard = nn.Linear(full.in_features, full.out_features // world, bias=False, device="meta")
            else:
                shard = nn.Linear(full.in_features // world, full.out_features, bias=False, device="meta")
            setattr(mods[parent], attr, shard)
    files = _tensor_files(directory)
    state = {}
    for name, param in model.state_dict().items():
        hf = herd_to_hf_name(name)
        path = files.get(hf, directory / SINGLE_FILE)
        with safe_open(str(path), framework="pt") as f:
            piece = f.get_slice(hf)
            module = name.rsplit(".", 1)[0].split(".", 2)[-1] if name.startswith("layers.") else ""
            if module in COLUMN:
                rows = param.shape[0]
                state[name] = piece[rank * rows:(rank + 1) * rows]
            elif module in ROW:
                cols = param.shape[1]
                state[name] = piece[:, rank * cols:(rank + 1) * cols]
            else:
                state[name] = piece[:]
            state[name] = state[name].to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def wrap_row_parallel(model: Transformer, group=None) -> Transformer:
    """Put an all-reduce after every row-parallel layer (after LoRA wrapping, so LoRA is summed too)."""
    mods = dict(model.named_modules())
    for i in range(model.cfg.n_layers):
        for name in ROW:
            parent, attr = f"layers.{i}.{name}".rsplit(".", 1)
            setattr(mods[parent], attr, AllReduce(mods[f"layers.{i}.{name}"], group))
    return model
