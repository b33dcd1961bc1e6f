"""Linear layers with their weights pre-packed for oneDNN: fast small-batch inference on CPU.

Decode multiplies a few activation rows by every weight matrix, so its speed is how fast the
weights stream through the cores. PyTorch's plain `linear` re-lays-out the weight on every call
(bf16) or takes MKL's general GEMM (fp32); packing it once into oneDNN's blocked layout (what
`torch.compile` does for frozen CPU graphs) makes a 1-9 row product about 1.5x (bf16) to 2x
(fp32) faster here, and a 9-row speculative verify cost about what a 1-row step costs. fp32
stays fp32 math (results equal to rounding). Inference only: packed weights take no gradient.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    """fp32 on any CPU with oneDNN, bf16 where the CPU has native bf16; elsewhere (fp16, GPUs) the
    plain linear is used."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """A bias-free nn.Linear whose weight lives only in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear takes bias-free linears (all of Llama's are)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Not a Parameter: an opaque oneDNN tensor is not trainable and `.to()` cannot move it.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [None], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of an inference model with a PackedLinear, in place, where packing
    is supported for its dtype and device. Returns how many were packed."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    packed = 0
    for name, linear in targets:
        if not packing_supported(linear.weight.dtype, linear.weight.device):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear))
        packed += 1
    return packed


def weight_numel(model: nn.Module) -> int:
    """Parameters plus packed weights: what a model holds, packed or not."""
    return (sum(p.numel() for p in model.parameters())
            + sum(m.weight.numel() for m in model.modules() if isinstance(m, PackedLinear)))
