"""Batched multi-LoRA: every row of a batch may use a different adapter, grouped by adapter.

Each adapted linear holds the A and B matrices of `slots` adapters (slot 0 stays all-zero for
rows on the base model), padded to the largest rank with zeros so a smaller rank is exact. A
forward computes every resident adapter's A x for the whole batch in one matmul, keeps for each
row only its own adapter's columns (times its scaling), and applies B in a second matmul:

    y[b] = W x[b] + s[i_b] * B[i_b] (A[i_b] x[b])

Each adapter's weights are read once per step however many rows use it (as Punica's SGMV and
S-LoRA do) and nothing is copied per row, unlike gathering each row's A and B. The shapes depend
only on the batch size and the largest resident rank, never on which rows use which adapter, so
the step can be captured once in a CUDA graph and replayed with any mix of adapters.

Layout: A is [max_rank, slots + 1, in] and B is [max_rank, slots + 1, out], so the first r_eff
ranks of every slot are one contiguous [r_eff * (slots + 1), ...] matrix (r_eff = the largest
rank loaded); column j * (slots + 1) + slot belongs to rank j of that slot.

For tensor parallelism the same layer takes a shard: column-parallel layers keep A whole and
shard B by output rows, row-parallel layers shard A by input columns and keep B whole (their
outputs are summed by the all-reduce that follows the base layer anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama.config import LlamaConfig
from llama.lora import LINEAR_TARGETS, LoraSpec, peft_key

ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


class LoraRows:
    """What every adapted layer of one model shares in a forward: each row's adapter as a column
    weight [B, r_eff * (slots + 1)] (its scaling on its own slot's columns, zero elsewhere)."""

    def __init__(self, slots: int, max_rank: int, dtype: torch.dtype, device: torch.device | str):
        self.slots = slots + 1
        self.scaling = torch.zeros(self.slots, dtype=dtype, device=device)
        self.ranks = [0] * self.slots
        self.r_eff = 0
        self.weight: torch.Tensor | None = None

    def set(self, indices: torch.Tensor) -> None:
        onehot = indices[:, None] == torch.arange(self.slots, device=indices.device)[None, :]
        w = onehot.to(self.scaling.dtype) * self.scaling[None, :]
        self.weight = w[:, None, :].expand(-1, self.r_eff, -1).reshape(indices.shape[0], -1)


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: LoraRows, max_rank: int):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.rows = rows
        self.register_buffer("A", torch.zeros(max_rank, rows.slots, base.in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(max_rank, rows.slots, base.out_features, dtype=dtype, device=device))
        self.loaded: set[int] = set()  # slots whose adapter targets this layer
        self.active = False  # does any row of this batch use an adapter that targets this layer?

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA part alone: s * B (A x) with each row's own adapter, [..., in] -> [..., out]."""
        r = self.rows.r_eff
        a = self.A[:r].view(-1, self.A.shape[-1])
        b = self.B[:r].view(-1, self.B.shape[-1])
        w = self.rows.weight
        mid = F.linear(x, a) * (w[:, None, :] if x.dim() == 3 else w)
        return mid @ b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x) if self.active else y


def attach_multi_lora(model: nn.Module, slots: int, max_rank: int,
                      targets: list[str] | None = None) -> dict[str, MultiLoraLinear]:
    """Wrap every linear LoRA may target (all by default) with a MultiLoraLinear, in place."""
    cfg: LlamaConfig = model.cfg
    short = targets or sorted(LINEAR_TARGETS)
    mods = dict(model.named_modules())
    param = next(model.parameters())
    rows = LoraRows(slots, max_rank, param.dtype, param.device)
    out = {}
    for i in range(cfg.n_layers):
        for t in short:
            path = f"layers.{i}.{LINEAR_TARGETS[t]}"
            parent, attr = path.rsplit(".", 1)
            layer = MultiLoraLinear(mods[path], rows, max_rank)
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
    if not layers:
        return
    rows = next(iter(layers.values())).rows
    if spec.r > rows_max_rank(layers):
        raise ValueError(f"adapter rank {spec.r} exceeds the server's max LoRA rank {rows_max_rank(layers)}")
    with torch.no_grad():
        for path, layer in layers.items():
            layer.A[:, slot].zero_()
            layer.B[:, slot].zero_()
            layer.loaded.discard(slot)
            module = path.split(".", 2)[2]
            if module not in targeted:
                continue
            a, b = state[peft_key(path, "A")], state[peft_key(path, "B")]
            if tp_world > 1:
                if module in ROW_PARALLEL:
                    a = _shard(a, 1, tp_rank, tp_world)
                else:
                    b = _shard(b, 0, tp_rank, tp_world)
            layer.A[: spec.r, slot].copy_(a)
            layer.B[: spec.r, slot].copy_(b.T)
            layer.loaded.add(slot)
        rows.scaling[slot] = spec.scaling
        rows.ranks[slot] = spec.r
        rows.r_eff = max(rows.ranks)


def rows_max_rank(layers: dict[str, MultiLoraLinear]) -> int:
    return next(iter(layers.values())).A.shape[0]


def set_rows(layers: dict[str, MultiLoraLinear], indices: torch.Tensor, used: set[int] | None = None,
             all_active: bool = False) -> None:
    """Tell every layer which slot each batch row uses (0 = base); layers no row adapts skip LoRA.

    `used` (the slots in `indices`, known on the host) saves reading the device tensor back;
    `all_active` runs every layer's LoRA path (for a CUDA graph captured once for any mix)."""
    if not layers:
        return
    if used is None:
        used = set(indices.tolist())
    used = set(used) - {0}
    for layer in layers.values():
        layer.active = all_active or bool(used & layer.loaded)
    if any(layer.active for layer in layers.values()):  # a base-only step needs no per-row weights
        next(iter(layers.values())).rows.set(indices)
