"""Single-prompt generation: prefill once, then decode one token at a time from the KV cache.

Sampling is llama/sampler.py's, the serving engine's own: temperature 0 is greedy, a seed gives
the same tokens here as in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import random

from llama.model import Transformer
from llama.paged_cache import PagedKVCache, blocks_for, contiguous_tables
from llama.sampler import SamplingBatch, sample


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate past EOS (benchmarks: vLLM's ignore_eos)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop id) or "length"
    prompt_tokens: int = 0


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], params: SamplingParams,
             eos_id: int | None = None) -> Generation:
    """Generate up to `params.max_tokens` tokens after `prompt_ids`; the stop token is not returned."""
    cfg = model.cfg
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if len(prompt_ids) >= cfg.max_seq_len:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context window is {cfg.max_seq_len}")
    max_new = min(params.max_tokens, cfg.max_seq_len - len(prompt_ids))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    block = 16
    n_blocks = blocks_for(len(prompt_ids) + max_new, block)
    cache = PagedKVCache(cfg, n_blocks + 1, block, dtype=dtype, device=device)
    tables = contiguous_tables(1, n_blocks, device)
    stops = set(params.stop_ids) | ({cfg.eos_id if eos_id is None else eos_id})
    seed = params.seed if params.seed is not None else random.getrandbits(63)

    tokens = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    out: list[int] = []
    for i in range(max_new):
        cache.bind(tables, positions, span=len(prompt_ids) + i)
        logits = model(tokens, positions, cache, last_only=True)[:, -1]
        settings = SamplingBatch([params.temperature], [params.top_p], [params.top_k], [seed], [i])
        nxt = int(sample(logits, settings)[0])
        if nxt in stops:
            return Generation(out, "stop", len(prompt_ids))
        out.append(nxt)
        tokens = torch.tensor([[nxt]], device=device)
        positions = positions[:, -1:] + 1
    return Generation(out, "length", len(prompt_ids))
