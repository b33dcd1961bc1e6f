"""The Llama 2 transformer in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameter names follow Meta's reference (`tok_embeddings`, `layers.N.attention.wq`, ...); the
rotary embedding uses Hugging Face's half-split convention, so HF safetensors load with a rename
only and Meta checkpoints get the q/k permutation once at import (llama/meta_format.py).

Every forward takes explicit positions and an optional KV cache, so the same code serves
training (no cache, causal), single-prompt generation, and the serving engine's batched
prefill/decode over cache slots.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llama.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ELEMENTWISE["rms_norm"](x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the activation dtype, as both references do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for `positions` [B, T] -> [B, T, head_dim], computed in fp32."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


# The memory-bound elementwise steps of a layer. Eager, each is several kernels and passes over
# the activations; `compile_elementwise` swaps in torch.compile'd versions (one fused kernel
# each) for a GPU serving process. Training and CPU inference keep the eager ones.
ELEMENTWISE = {"rms_norm": rms_norm, "apply_rope": apply_rope, "silu_mul": silu_mul}


EAGER_ELEMENTWISE = dict(ELEMENTWISE)


def compile_elementwise(device: torch.device, dtype: torch.dtype) -> bool:
    """Fuse RMSNorm, RoPE and SwiGLU's SiLU-multiply with torch.compile (Triton kernels on CUDA),
    after a trial run of each on `device`. Returns False, keeping the eager versions, where
    torch.compile does not work (no compiler, an unsupported device)."""
    try:
        compiled = {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in EAGER_ELEMENTWISE.items()}
        x = torch.randn(2, 3, 8, device=device, dtype=dtype)
        for name, args in (("rms_norm", (x, torch.ones(8, device=device, dtype=dtype), 1e-5)),
                           ("apply_rope", (x[:, None], x, x)), ("silu_mul", (x, x))):
            torch.testing.assert_close(compiled[name](*args), EAGER_ELEMENTWISE[name](*args))
    except Exception:  # noqa: BLE001 - an optimisation only
        return False
    ELEMENTWISE.update(compiled)
    return True


class KVCache(Protocol):
    """What attention needs from a cache (llama/paged_cache.py's PagedKVCache is the one we use)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, KVH, T, D] at this step's positions; return the keys/values to attend to."""
        ...

    def attention_mask(self) -> torch.Tensor | None:
        """Boolean [B, 1, T, S] (True = attend) matching what `update` returns, or None for causal."""
        ...

    def attend_in_place(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Attention computed by the cache itself (a paged kernel) -> [B, H, T, D], or None."""
        ...


class FusedLinear(nn.Module):
    """Several bias-free projections of the same input as one matmul (q/k/v, gate/up), split after.

    `parts` keeps the original linears' LoRA deltas (llama/multi_lora.py), if any, so an adapter
    applies to its own slice exactly as before fusion."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        bases = [getattr(m, "base", m) for m in linears]
        self.sizes = [b.weight.shape[0] for b in bases]
        self.weight = nn.Parameter(torch.cat([b.weight.detach() for b in bases]), requires_grad=False)
        self.deltas = [m if hasattr(m, "delta") else None for m in linears]
        for m in self.deltas:
            if m is not None:
                m.base = None  # the fused weight replaces it

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = list(F.linear(x, self.weight).split(self.sizes, dim=-1))
        for i, m in enumerate(self.deltas):
            if m is not None and m.active:
                outs[i] = outs[i] + m.delta(x)
        return outs


def fuse_projections(model: nn.Module) -> None:
    """q/k/v into one `wqkv` and gate/up into one `w13` in every layer (inference: one matmul instead
    of three or two, for GPUs where each launch and each pass over the input counts)."""
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        a.wqkv = FusedLinear([a.wq, a.wk, a.wv])
        del a.wq, a.wk, a.wv
        f.w13 = FusedLinear([f.w1, f.w3])
        del f.w1, f.w3


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x) if hasattr(self, "wqkv") else (self.wq(x), self.wk(x), self.wv(x))
        # Head counts come from the weights so that a tensor-parallel shard runs the same code.
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        rope = ELEMENTWISE["apply_rope"]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v = cache.update(layer, k, v)
            out = cache.attend_in_place(q, k, v)
            if out is not None:
                return self.wo(out.transpose(1, 2).reshape(b, t, -1))
            mask = cache.attention_mask()
        if mask is not None and _eager_attention_pays(q):
            out = eager_attention(q, k, v, mask)
        else:
            out = sdpa(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's fused attention (flash / memory-efficient kernels on GPU), causal without a mask.
    Grouped-query K/V are not repeated where torch supports `enable_gqa` (2.5+)."""
    causal = mask is None and q.shape[2] > 1
    if q.shape[1] != k.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        except TypeError:  # torch < 2.5
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _eager_attention_pays(q: torch.Tensor) -> bool:
    """PyTorch's CPU flash-attention kernel is slow in bf16/fp16 for batched short queries (decode):
    for 32 rows x 1 token over 300 cached positions it took 5.9 ms a layer vs 1.3 ms for the plain
    matmul-softmax-matmul (2 threads, AVX-512). It stays the better kernel for one or a few rows,
    for fp32, on GPUs, and for long queries (a prefill), where the full score matrix that eager
    attention materializes would cost memory quadratic in the prompt."""
    b, _, t, _ = q.shape
    return q.device.type == "cpu" and q.dtype != torch.float32 and b >= 8 and t <= 16


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention as transformers' eager Llama path computes it (scores in the model dtype,
    softmax in fp32). Grouped-query heads are folded into the query rows, so K/V are not repeated.

    q [B, H, T, D], k/v [B, Hkv, S, D], mask [B, 1, T, S] (True = attend) -> [B, H, T, D]."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    q = q.reshape(b, hkv, g * t, d)  # query heads of one KV head are adjacent (head i uses kv head i // g)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5
    keep = mask[:, :, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return out.view(b, h, t, d)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x) if hasattr(self, "w13") else (self.w1(x), self.w3(x))
        return self.w2(ELEMENTWISE["silu_mul"](gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, self.layer, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # A plain fp32 tensor, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with `last_only`).

        Without a cache the sequence is attended causally from position 0 (training, scoring).
        With a cache, `positions` [B, T] place the tokens; the cache supplies the mask.
        `last_index` [B] picks each row's own last position (right-padded batched prefill).
        """
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        if last_index is not None:
            h = h[torch.arange(b, device=h.device), last_index][:, None]
        elif last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Random weights for tests and tiny models; norms start at one as in training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def random_model(cfg: LlamaConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A model with random weights made directly on `device` in `dtype` (benchmarks at 7B-70B
    shapes: `init_weights` draws on the CPU, which would take minutes and an fp32 host copy)."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.eval()
