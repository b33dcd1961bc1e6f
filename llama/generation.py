"""Single-prompt generation: prefill once, then decode one token at a time from the KV cache.

Sampling follows Meta's reference (temperature, then top-p over the sorted distribution) with
top-k added; temperature 0 is greedy. A seeded `torch.Generator` makes sampling repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama.model import SlotKVCache, Transformer


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    cache = SlotKVCache(cfg, slots=1, max_seq_len=len(prompt_ids) + max_new, dtype=dtype, device=device)
    stops = set(params.stop_ids) | ({cfg.eos_id if eos_id is None else eos_id})
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    rows = torch.zeros(1, dtype=torch.long, device=device)

    tokens = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    out: list[int] = []
    for _ in range(max_new):
        cache.bind(rows, positions)
        logits = model(tokens, positions, cache, last_only=True)[:, -1]
        nxt = int(sample_next(logits, params.temperature, params.top_p, params.top_k, gen)[0])
        if nxt in stops:
            return Generation(out, "stop", len(prompt_ids))
        out.append(nxt)
        tokens = torch.tensor([[nxt]], device=device)
        positions = positions[:, -1:] + 1
    return Generation(out, "length", len(prompt_ids))
