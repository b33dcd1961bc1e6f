"""Paged decode attention in Triton: each query reads its request's K/V blocks where they lie.

For decode (one to a few query tokens per row) attention is a pass over the cached K/V, so its
cost is the bytes read. Gathering a batch's blocks into a contiguous buffer first (and repeating
K/V for grouped-query heads) reads and writes them twice more; this kernel reads every block once
per query head, straight from the pool, with an online softmax (FlashAttention's recurrence).

One program per (row, query head, query token). A query at position p attends keys 0..p of its
row, so speculative verification (several tokens per row) is causal for free.

The kernel is plain Triton: it runs on NVIDIA GPUs, and under `TRITON_INTERPRET=1` on CPU
tensors, which is how the test suite checks it on machines without a GPU.
"""

from __future__ import annotations

import functools

import torch


def triton_available(device: torch.device) -> bool:
    """Should attention on `device` use the kernel: CUDA with Triton. (On CPU the interpreter runs
    it for tests, far too slowly to serve.)"""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_attention_kernel(Q, K, V, O, TABLES, POS, scale,
                               sq_b, sq_h, sq_t, sk_n, sk_s, sk_h, so_b, so_h, so_t, st_b,
                               T: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        qt = tl.program_id(2)
        kv_head = head // GROUP
        d = tl.arange(0, D)
        offs = tl.arange(0, BLOCK)
        pos = tl.load(POS + row * T + qt)
        q = tl.load(Q + row * sq_b + head * sq_h + qt * sq_t + d).to(tl.float32) * scale
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), dtype=tl.float32)
        for i in range(0, pos // BLOCK + 1):
            block = tl.load(TABLES + row * st_b + i).to(tl.int64)
            base = block * sk_n + kv_head * sk_h
            ptr = base + offs[:, None] * sk_s + d[None, :]
            k = tl.load(K + ptr).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            s = tl.where(i * BLOCK + offs <= pos, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(V + ptr).to(tl.float32)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        out = acc / total
        tl.store(O + row * so_b + head * so_h + qt * so_t + d, out.to(O.dtype.element_ty))

    return paged_attention_kernel


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], pools [num_blocks, block_size, KVH, D], tables [B, max_blocks] (int),
    positions [B, T] -> [B, H, T, D]. Each query attends its row's keys at positions <= its own."""
    b, h, t, d = q.shape
    _, block, kvh, _ = k_pool.shape
    out = torch.empty_like(q)
    tables = tables.contiguous()
    positions = positions.contiguous()
    _kernel()[(b, h, t)](
        q, k_pool, v_pool, out, tables, positions, d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        out.stride(0), out.stride(1), out.stride(2), tables.stride(0),
        T=t, GROUP=h // kvh, BLOCK=block, D=d)
    return out


def paged_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                              positions: torch.Tensor) -> torch.Tensor:
    """The same in plain torch (gather, repeat, mask, softmax): the definition the kernel must meet."""
    b, h, t, d = q.shape
    kvh = k_pool.shape[2]
    k = k_pool[tables].reshape(b, -1, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
    v = v_pool[tables].reshape(b, -1, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
    keys = torch.arange(k.shape[2], device=q.device)
    mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
    scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ v.float()).to(q.dtype)
