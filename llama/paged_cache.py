"""A paged KV cache: fixed-size blocks of token positions, handed out per request by a block table.

Memory is one pool per layer for K and for V, allocated once and stored head-major,
`[kv_heads, num_blocks, block_size, head_dim]` (each head's block is one contiguous
`block_size x head_dim` tile, as in vLLM's layout); `cache.k[layer]` shows it as
`[num_blocks, block_size, kv_heads, head_dim]`, the shape the kernel and the tests index. A request owns a list of blocks (its block table); position p
of that request lives in block `table[p // block_size]` at offset `p % block_size`. Nothing is
reserved for a context a request never reaches, so the pool holds as many requests as their
actual lengths allow, and a scheduler can admit, grow and preempt requests block by block.

Block 0 is never handed out: padding tokens of a right-padded batch (and table entries past a
request's last block) point there, so their writes land in a scratch block no one reads.

Attention reads K/V in one of two ways:
- on CUDA with Triton, decode (a few query tokens per row) reads the blocks in place through a
  paged-attention kernel (llama/paged_attention.py): no gather, no GQA repeat;
- otherwise (CPU, prefill chunks) the row's blocks up to the longest context in the batch are
  gathered into a reused buffer and attended with SDPA or the eager kernel. The head-major
  storage makes that one `index_select` whose output is already a contiguous `[B, KVH, S, D]`:
  with the token-major layout the gathered view was strided, and the matmuls of the eager
  kernel copied it again (a quarter of a bf16 decode step at batch 32 on CPU).
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
        shape = (cfg.n_layers, kvh, num_blocks, block_size, cfg.head_dim)
        self.k_heads = torch.zeros(shape, dtype=dtype, device=device)  # the storage, head-major
        self.v_heads = torch.zeros(shape, dtype=dtype, device=device)
        # [layers, num_blocks, block_size, kvh, head_dim] views of the same memory.
        self.k = self.k_heads.permute(0, 2, 3, 1, 4)
        self.v = self.v_heads.permute(0, 2, 3, 1, 4)
        self.device = self.k.device
        self.use_kernel = False  # set by the runner where the Triton kernel is available (CUDA)
        self._tables: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._context_lens: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._gather_index: torch.Tensor | None = None
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
        # Row b's blocks for head h, in (b, h, block) order: rows of the [KVH * num_blocks, bs, D] pool.
        heads = torch.arange(self.k_heads.shape[1], device=block_tables.device) * self.num_blocks
        self._gather_index = (heads[None, :, None] + block_tables[:, None, : self._span_blocks]).reshape(-1)
        keys = torch.arange(self._span_blocks * bs, device=positions.device)
        self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, KVH, T, D] into their blocks; return the keys/values to attend:
        [B, KVH, S, D] views of gathered blocks, or the raw pools when attention reads in place."""
        assert self._slots is not None, "bind() the cache before a forward"
        for pool, new in ((self.k_heads[layer], k), (self.v_heads[layer], v)):
            kvh, _, _, d = pool.shape
            pool.view(kvh, -1, d).index_copy_(1, self._slots, new.transpose(0, 1).reshape(kvh, -1, d))
        if self._in_place:
            return self.k[layer], self.v[layer]
        return self._gather(self.k_heads[layer], 0), self._gather(self.v_heads[layer], 1)

    def _gather(self, pool: torch.Tensor, which: int) -> torch.Tensor:
        """The batch rows' first `span_blocks` blocks of a head-major pool [KVH, blocks, bs, D], as a
        contiguous [B, KVH, S, D] (a view of a reused buffer)."""
        kvh, _, bs, d = pool.shape
        b = self._tables.shape[0]
        n = self._gather_index.numel() * bs * d
        buf = self._buffers[which]
        if buf is None or buf.numel() < n:
            buf = self._buffers[which] = torch.empty(2 * n, dtype=pool.dtype, device=pool.device)
        out = buf[:n].view(-1, bs, d)
        torch.index_select(pool.view(-1, bs, d), 0, self._gather_index, out=out)
        return out.view(b, kvh, self._span_blocks * bs, d)

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
