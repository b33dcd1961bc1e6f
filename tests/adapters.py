"""Helpers that make LoRA adapters for tests (Herd-made and peft-made)."""

from __future__ import annotations

from pathlib import Path

import torch

from llama.config import LlamaConfig
from llama.lora import LoraSpec, expected_shapes, save_adapter


def random_adapter(directory: Path, cfg: LlamaConfig, base: str = "base", r: int = 4, alpha: float = 8.0,
                   targets=("q_proj", "v_proj"), seed: int = 0, rslora: bool = False) -> Path:
    """A Herd adapter with nonzero A and B (so it changes the output)."""
    spec = LoraSpec(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                    base_model_name_or_path=base)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) * 0.2 for k, shape in expected_shapes(cfg, spec).items()}
    save_adapter(directory, spec, state)
    return directory
