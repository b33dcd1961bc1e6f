"""Batched sampling on the device: greedy, temperature, top-k, top-p, a seed per row.

Every row of a batch may have its own settings; the whole batch is sampled with a few tensor
ops and no per-row Python, so the only device->host transfer of a step is the sampled ids.

Randomness is counter-based, not a stateful generator: the noise for token v of row b is a hash
of (the row's seed, the index of the token being generated, v). The same seed therefore gives
the same tokens whichever batch a request shares, whatever ran before it, and in `herd generate`
as in the serving engine. A row draws with the Gumbel-max trick (argmax of logits/T plus Gumbel
noise), which is an exact sample of softmax(logits/T) restricted to the top-k/top-p set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it fits int64 without overflow, on any device


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors holding values < 2**32."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1) for [rows, vocab]: a function of (seed, offset, token id) only."""
    seeds = seeds.to(torch.int64)
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _mix32(lo ^ _mix32(hi ^ _mix32(offsets.to(torch.int64) & _MASK32)))
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32(row[:, None] ^ _mix32(tokens[None, :] + 0x9E3779B9 & _MASK32))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


@dataclass
class SamplingBatch:
    """Per-row settings of one step; temperature 0 means greedy. Lists are on the host."""
    temperature: list[float]
    top_p: list[float]
    top_k: list[int]
    seed: list[int]
    offset: list[int]  # index of the token being generated (0 = the first one)

    @property
    def all_greedy(self) -> bool:
        return all(t == 0 for t in self.temperature)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] -> token ids [B] on the logits' device."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    rows = [i for i, t in enumerate(batch.temperature) if t > 0]
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, idx).float()
    temps = torch.tensor([batch.temperature[i] for i in rows], device=dev)[:, None]
    sub = sub / temps
    noise = uniform_noise(torch.tensor([batch.seed[i] for i in rows], device=dev),
                          torch.tensor([batch.offset[i] for i in rows], device=dev), sub.shape[-1])
    gumbel = -torch.log(-torch.log(noise))
    top_k = [batch.top_k[i] for i in rows]
    top_p = [batch.top_p[i] for i in rows]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(sub, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        rank = torch.arange(sub.shape[-1], device=dev)[None, :]
        k = torch.tensor([k if k > 0 else sub.shape[-1] for k in top_k], device=dev)[:, None]
        p = torch.tensor(top_p, device=dev)[:, None]
        # keep a token while the mass before it is under top_p (the first token always stays)
        keep = (rank < k) & ((probs.cumsum(-1) - probs) < p)
        drop = torch.zeros_like(keep).scatter_(1, order, ~keep)
        sub = sub.masked_fill(drop, float("-inf"))
    picked = (sub + gumbel).argmax(dim=-1)
    return greedy.index_copy(0, idx, picked)
