"""Model-state memory of a data-parallel training job per ZeRO stage (Rajbhandari et al., 2020).

One function, shared by `bench/train.py` (measured RSS beside the formula) and `herd plan`
(what hardware a job needs), so the two can never disagree.

Per parameter, a job keeps the weights (p bytes), their gradients (g) and Adam's state (k):
fp32 training (CPU) p=4, g=4, k=8 (m, v); mixed precision (GPU, bf16 with fp32 master weights)
p=2, g=2, k=12 (master copy, m, v). ZeRO partitions over N workers: stage 1 the optimizer
state, stage 2 also the gradients, stage 3 also the weights:

    stage 0: (p + g + k)Ψ        fp32 16Ψ           mixed 16Ψ
    stage 1: (p + g)Ψ + kΨ/N     fp32 8Ψ + 8Ψ/N     mixed 4Ψ + 12Ψ/N
    stage 2: pΨ + (g + k)Ψ/N     fp32 4Ψ + 12Ψ/N    mixed 2Ψ + 14Ψ/N
    stage 3: (p + g + k)Ψ/N      fp32 16Ψ/N         mixed 16Ψ/N

With optimizer offload (ZeRO-Offload), the optimizer's share moves to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelStateMemory:
    device_bytes: float  # per worker (per GPU, or per process on CPU): weights, gradients, optimizer
    host_bytes: float  # per worker: the optimizer state offloaded to host memory (0 without offload)

    @property
    def total_bytes(self) -> float:
        return self.device_bytes + self.host_bytes


def bytes_per_param(mixed_precision: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter for Adam."""
    return (2, 2, 12) if mixed_precision else (4, 4, 8)


def zero_model_state(params: float, stage: int, workers: int, mixed_precision: bool,
                     offload_optimizer: bool = False) -> ModelStateMemory:
    """Bytes of model state one worker holds for a full fine-tune of `params` parameters."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    p, g, k = bytes_per_param(mixed_precision)
    n = workers
    weights = p * params / n if stage >= 3 else p * params
    grads = g * params / n if stage >= 2 else g * params
    optim = k * params / n if stage >= 1 else k * params
    if offload_optimizer:
        return ModelStateMemory(weights + grads, optim)
    return ModelStateMemory(weights + grads + optim, 0.0)
