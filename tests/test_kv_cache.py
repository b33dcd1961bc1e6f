"""The KV cache: decode from the cache equals a full forward pass at every position."""

import torch

from conftest import make_model
from llama.config import LlamaConfig
from llama.model import SlotKVCache

CFG = LlamaConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, intermediate_size=176,
                  max_seq_len=128)


def test_decode_equals_full_forward_at_every_position():
    model = make_model(CFG, seed=2)
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = SlotKVCache(CFG, slots=1)
        rows = torch.tensor([0])
        prefix = 7
        cache.bind(rows, torch.arange(prefix)[None])
        steps = [model(tokens[:, :prefix], torch.arange(prefix)[None], cache)]
        for pos in range(prefix, 40):
            cache.bind(rows, torch.tensor([[pos]]))
            steps.append(model(tokens[:, pos:pos + 1], torch.tensor([[pos]]), cache))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5


def test_slots_at_different_positions_share_one_batch():
    """Three requests of different lengths in non-adjacent slots, decoded together."""
    model = make_model(CFG, seed=4)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=gen) for n in (5, 12, 9)]
    slots = torch.tensor([3, 0, 6])
    cache = SlotKVCache(CFG, slots=8, max_seq_len=32)
    with torch.no_grad():
        for seq, slot in zip(seqs, slots):  # prefill each request separately, all but the last token
            n = len(seq) - 1
            cache.bind(slot[None], torch.arange(n)[None])
            model(seq[None, :n], torch.arange(n)[None], cache)
        last = torch.stack([s[-1] for s in seqs])[:, None]
        pos = torch.tensor([[len(s) - 1] for s in seqs])
        cache.bind(slots, pos)
        batched = model(last, pos, cache)[:, 0]
        for i, seq in enumerate(seqs):
            ref = model(seq[None])[0, -1]
            assert (batched[i] - ref).abs().max().item() <= 1e-5


def test_eager_attention_equals_sdpa_with_grouped_heads():
    """The CPU decode path (matmul-softmax-matmul, GQA heads folded into rows) against PyTorch's SDPA."""
    import torch.nn.functional as F

    from llama.model import eager_attention
    gen = torch.Generator().manual_seed(3)
    b, h, hkv, t, s, d = 5, 8, 2, 3, 11, 16
    q = torch.randn(b, h, t, d, generator=gen)
    k, v = torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    pos = torch.randint(t - 1, s, (b,), generator=gen)[:, None] - torch.arange(t - 1, -1, -1)[None]
    mask = (torch.arange(s)[None, None, :] <= pos[:, :, None])[:, None]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                         attn_mask=mask)
    assert (eager_attention(q, k, v, mask) - ref).abs().max().item() <= 1e-5
    half = eager_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()
    assert (half - ref).abs().max().item() <= 0.05


def test_bf16_batched_decode_takes_the_eager_path_and_matches_fp32():
    """Eight slots decoded together in bf16 (the eager attention path) give fp32's logits within
    bf16 rounding, and the same greedy tokens."""
    from llama.model import _eager_attention_pays
    model = make_model(CFG, seed=5)
    half = make_model(CFG, seed=5).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, 300, (8, 10), generator=gen)
    rows, pos = torch.arange(8).flip(0), torch.full((8, 1), 9)
    assert _eager_attention_pays(torch.zeros(8, 8, 1, 8, dtype=torch.bfloat16))
    out = []
    with torch.no_grad():
        for m, dtype in ((model, torch.float32), (half, torch.bfloat16)):
            cache = SlotKVCache(CFG, slots=8, max_seq_len=32, dtype=dtype)
            cache.bind(rows, torch.arange(9).expand(8, 9))
            m(seqs[:, :9], torch.arange(9).expand(8, 9), cache)
            cache.bind(rows, pos)
            out.append(m(seqs[:, 9:], pos, cache)[:, 0])
    assert (out[0] - out[1]).abs().max().item() <= 0.05 * out[0].abs().max().item()
    assert torch.equal(out[0].argmax(-1), out[1].argmax(-1))


def test_eager_attention_only_for_batched_short_half_precision_queries_on_cpu():
    from llama.model import _eager_attention_pays
    q = lambda b, t, dtype=torch.bfloat16: torch.zeros(b, 4, t, 8, dtype=dtype)  # noqa: E731
    assert _eager_attention_pays(q(8, 1)) and _eager_attention_pays(q(32, 9))
    assert not _eager_attention_pays(q(4, 1))  # one or a few rows: the flash kernel is faster
    assert not _eager_attention_pays(q(8, 512))  # a long prefill: no quadratic score matrix
    assert not _eager_attention_pays(q(32, 1, torch.float32))
