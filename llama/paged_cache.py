"""A paged KV cache: fixed-size blocks of token positions, handed out per request by a block table.

Memory is one pool per layer, `[num_blocks, block_size, kv_heads, head_dim]` for K and for V
(vLLM's layout), allocated once. A request owns a list of blocks (its block table); position p
of that request lives in block `table[p // block_size]` at offset `p % block_size`. Nothing is
reserved for a context a request never reaches, so the pool holds as many requests as their
actual lengths allow, and a scheduler can admit, grow and preempt requests block by block.

Block 0 is never handed out: padding tokens of a right-padded batch (and table entries past a
request's last block) point there, so their writes land in a scratch block no one reads.

Attention reads K/V in one of two ways:
- on CUDA with Triton, decode (a few query tokens per row) reads the blocks in place through a
  paged-attention kernel (llama/paged_attention.py): no gather, no GQA repeat;
- otherwise (CPU, prefill chunks) the row's blocks up to the longest context in the batch are
  gathered into a reused buffer and attended with SDPA or the eager kernel.
"""

from __future__ import annotations

import math

import torch

from llama.config import LlamaConfig

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """How many blocks hold `tokens` positions."""
    return math.ceil(tokens / block_size)


def kv_bytes_per_token(cfg: LlamaConfig, dtype: torch.dtype, n_kv_heads: int | None = None) -> int:
    """K and V of one token over all layers: 2 * layers * kv_heads * head_dim * element size."""
    kvh = n_kv_heads or cfg.n_kv_heads
    return 2 * cfg.n_layers * kvh * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    """The block pools of every layer plus the per-forward binding of batch rows to block tables."""

    def __init__(self, cfg: LlamaConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 n_kv_heads: int | None = None):
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks (block 0 is scratch), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        kvh = n_kv_heads or cfg.n_kv_heads
        shape = (cfg.n_layers, num_blocks, block_size, kvh, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.k.device
        self.use_kernel = False  # set by the runner where the Triton kernel is available (CUDA)
        self._tables: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._context_lens: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._span_blocks = 0
        self._in_place = False
        self._buffers: list[torch.Tensor | None] = [None, None]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bind(self, block_tables: torch.Tensor, positions: torch.Tensor, span: int | None = None) -> None:
        """Say where this forward's tokens go: block_tables [B, max_blocks] (int), positions [B, T].

        `span` is the longest context (last position + 1) in the batch; the caller knows it on the
        host, so no device value is read here (no sync). Without it, it is computed (one sync).
        Padding tokens must point at NULL_BLOCK through their table entries or be harmless writes
        beyond their row's last real position (they are overwritten before they are attended)."""
        bs = self.block_size
        blocks = block_tables.gather(1, torch.div(positions, bs, rounding_mode="floor"))
        self._slots = (blocks * bs + positions % bs).reshape(-1)
        self._tables, self._positions = block_tables, positions
        self._in_place = self.use_kernel and positions.shape[1] <= 16
        if self._in_place:  # the kernel reads each row's own length from `positions`
            self._mask = None
            return
        if span is None:
            span = int(positions.max()) + 1
        if span > block_tables.shape[1] * bs:
            raise ValueError(f"position {span - 1} is beyond the block table ({block_tables.shape[1]} blocks)")
        self._span_blocks = blocks_for(span, bs)
        keys = torch.arange(self._span_blocks * bs, device=positions.device)
        self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, KVH, T, D] into their blocks; return the keys/values to attend:
        [B, KVH, S, D] views of gathered blocks, or the raw pools when attention reads in place."""
        assert self._slots is not None, "bind() the cache before a forward"
        kp, vp = self.k[layer], self.v[layer]
        flat = (-1,) + kp.shape[2:]
        kp.view(flat).index_copy_(0, self._slots, k.transpose(1, 2).reshape((-1,) + kp.shape[2:]))
        vp.view(flat).index_copy_(0, self._slots, v.transpose(1, 2).reshape((-1,) + vp.shape[2:]))
        if self._in_place:
            return kp, vp
        return self._gather(kp, 0), self._gather(vp, 1)

    def _gather(self, pool: torch.Tensor, which: int) -> torch.Tensor:
        """The batch rows' first `span_blocks` blocks, as [B, KVH, S, D] (a view of a reused buffer)."""
        tables = self._tables[:, : self._span_blocks]
        b, nb = tables.shape
        n = b * nb * pool[0].numel()
        buf = self._buffers[which]
        if buf is None or buf.numel() < n:
            buf = self._buffers[which] = torch.empty(2 * n, dtype=pool.dtype, device=pool.device)
        out = buf[:n].view((b * nb,) + pool.shape[1:])
        torch.index_select(pool, 0, tables.reshape(-1), out=out)
        bs, kvh, d = pool.shape[1:]
        return out.view(b, nb * bs, kvh, d).transpose(1, 2)

    def attention_mask(self) -> torch.Tensor | None:
        return self._mask

    def attend_in_place(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor | None:
        """Attention straight from the pools (the paged kernel), or None where this forward gathers."""
        if not self._in_place:
            return None
        from llama.paged_attention import paged_attention
        return paged_attention(q, k_pool, v_pool, self._tables, self._positions)


def contiguous_tables(rows: int, blocks_per_row: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Block tables that give row r the blocks 1 + r*n .. (r+1)*n: a plain per-row cache (generation)."""
    return (1 + torch.arange(rows * blocks_per_row, device=device)).view(rows, blocks_per_row)
