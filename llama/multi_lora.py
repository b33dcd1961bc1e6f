"""Batched multi-LoRA (Punica-style): every row of a batch may use a different adapter.

Each adapted linear holds a stack of `slots` adapters, padded to the largest rank with zeros
(so a smaller rank is exact), and slot 0 stays all-zero for rows that use the base model. A
forward gathers each row's A and B and applies them with two batched matmuls:

    y[b] = W x[b] + s[i_b] * B[i_b] (A[i_b] x[b])

No Python loop over requests; the cost is two `bmm`s per adapted layer.

For tensor parallelism the same layer takes a shard: column-parallel layers keep A whole and
shard B by output rows, row-parallel layers shard A by input columns and keep B whole (their
outputs are summed by the all-reduce that follows the base layer anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from llama.config import LlamaConfig
from llama.lora import LINEAR_TARGETS, LoraSpec, peft_key

ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, slots: int, max_rank: int):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        # slot 0 = "no adapter", all zeros
        self.register_buffer("A", torch.zeros(slots + 1, max_rank, base.in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(slots + 1, base.out_features, max_rank, dtype=dtype, device=device))
        self.register_buffer("scaling", torch.zeros(slots + 1, dtype=dtype, device=device))
        self.indices: torch.Tensor | None = None  # [batch] slot per row, set by `set_rows`
        self.loaded: set[int] = set()  # slots whose adapter targets this layer
        self.active = False  # does any row of this batch use an adapter that targets this layer?

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.active:
            return y
        idx = self.indices
        a = self.A.index_select(0, idx)  # [b, r, in]
        b = self.B.index_select(0, idx)  # [b, out, r]
        s = self.scaling.index_select(0, idx).to(x.dtype)[:, None, None]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * s


def attach_multi_lora(model: nn.Module, slots: int, max_rank: int,
                      targets: list[str] | None = None) -> dict[str, MultiLoraLinear]:
    """Wrap every linear LoRA may target (all by default) with a MultiLoraLinear, in place."""
    cfg: LlamaConfig = model.cfg
    short = targets or sorted(LINEAR_TARGETS)
    mods = dict(model.named_modules())
    out = {}
    for i in range(cfg.n_layers):
        for t in short:
            path = f"layers.{i}.{LINEAR_TARGETS[t]}"
            parent, attr = path.rsplit(".", 1)
            layer = MultiLoraLinear(mods[path], slots, max_rank)
            setattr(mods[parent], attr, layer)
            out[path] = layer
    return out


def _shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size)


def load_into_slot(layers: dict[str, MultiLoraLinear], slot: int, spec: LoraSpec, state: dict[str, torch.Tensor],
                   tp_rank: int = 0, tp_world: int = 1) -> None:
    """Write one adapter into `slot` (1-based) of every layer; layers it does not target get zeros."""
    if slot < 1:
        raise ValueError("slot 0 is reserved for the base model")
    targeted = {LINEAR_TARGETS[t] for t in spec.target_modules}
    with torch.no_grad():
        for path, layer in layers.items():
            layer.A[slot].zero_()
            layer.B[slot].zero_()
            layer.scaling[slot] = 0.0
            layer.loaded.discard(slot)
            module = path.split(".", 2)[2]
            if module not in targeted:
                continue
            a, b = state[peft_key(path, "A")], state[peft_key(path, "B")]
            if spec.r > layer.A.shape[1]:
                raise ValueError(f"adapter rank {spec.r} exceeds the server's max LoRA rank {layer.A.shape[1]}")
            if tp_world > 1:
                if module in ROW_PARALLEL:
                    a = _shard(a, 1, tp_rank, tp_world)
                else:
                    b = _shard(b, 0, tp_rank, tp_world)
            layer.A[slot, : spec.r].copy_(a)
            layer.B[slot, :, : spec.r].copy_(b)
            layer.scaling[slot] = spec.scaling
            layer.loaded.add(slot)


def set_rows(layers: dict[str, MultiLoraLinear], indices: torch.Tensor) -> None:
    """Tell every layer which slot each batch row uses (0 = base); layers no row adapts skip LoRA."""
    used = set(indices.tolist()) - {0}
    for layer in layers.values():
        layer.indices = indices
        layer.active = bool(used & layer.loaded)
