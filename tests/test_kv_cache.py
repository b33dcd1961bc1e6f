"""The paged KV cache: attention over blocks equals attention over the whole sequence."""

import pytest
import torch

from conftest import make_model
from llama.config import LlamaConfig
from llama.paged_cache import PagedKVCache, blocks_for

CFG = LlamaConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, intermediate_size=176,
                  max_seq_len=128)
BLOCK = 4


def _shuffled_tables(rows: int, blocks_per_row: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """Each row gets scattered, non-adjacent blocks (never block 0): the paging must not matter."""
    ids = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed))[: rows * blocks_per_row] + 1
    return ids.view(rows, blocks_per_row)


def test_decode_equals_full_forward_at_every_position():
    model = make_model(CFG, seed=2)
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cache = PagedKVCache(CFG, num_blocks=64, block_size=BLOCK)
        tables = _shuffled_tables(1, blocks_for(40, BLOCK), 64)
        prefix = 7
        cache.bind(tables, torch.arange(prefix)[None])
        steps = [model(tokens[:, :prefix], torch.arange(prefix)[None], cache)]
        for pos in range(prefix, 40):
            cache.bind(tables, torch.tensor([[pos]]), span=pos + 1)
            steps.append(model(tokens[:, pos:pos + 1], torch.tensor([[pos]]), cache))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5


def _mixed_lengths_batch(model, cache, tables, seqs, chunk=None):
    """Prefill each request (in chunks if given), then decode their last tokens together."""
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            n = len(seq) - 1
            step = chunk or n
            for start in range(0, n, step):
                end = min(n, start + step)
                pos = torch.arange(start, end)[None]
                cache.bind(tables[i:i + 1], pos)
                model(seq[None, start:end], pos, cache)
        last = torch.stack([s[-1] for s in seqs])[:, None]
        pos = torch.tensor([[len(s) - 1] for s in seqs])
        cache.bind(tables, pos)
        return model(last, pos, cache)[:, 0]


@pytest.mark.parametrize("chunk", [None, 3])
def test_rows_of_different_lengths_in_scattered_blocks_share_one_batch(chunk):
    """Three requests of different lengths (GQA model), prefilled whole or in chunks, decoded together."""
    model = make_model(CFG, seed=4)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=gen) for n in (5, 12, 9)]
    cache = PagedKVCache(CFG, num_blocks=32, block_size=BLOCK)
    tables = _shuffled_tables(3, 3, 32, seed=5)
    batched = _mixed_lengths_batch(model, cache, tables, seqs, chunk)
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            ref = model(seq[None])[0, -1]
            assert (batched[i] - ref).abs().max().item() <= 1e-5


def test_padding_tokens_write_only_the_scratch_block():
    """A right-padded row's padding lands in block 0 (table entries past its blocks), not in anyone's blocks."""
    model = make_model(CFG, seed=4)
    cache = PagedKVCache(CFG, num_blocks=8, block_size=BLOCK)
    tables = torch.tensor([[1, 0], [2, 3]])  # row 0 owns one block; its padding goes to block 0
    tokens = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    before = cache.k[:, 4:].clone()
    with torch.no_grad():
        cache.bind(tables, torch.arange(7).expand(2, 7))
        model(tokens, torch.arange(7).expand(2, 7), cache)
    assert torch.equal(cache.k[:, 4:], before)  # blocks 4.. untouched
    assert cache.k[:, 0].abs().sum() > 0  # row 0's positions 4-6 went to scratch


def test_paged_kernel_equals_reference():
    """The Triton paged-attention kernel (run by Triton's interpreter on CPU) against plain torch:
    GQA, several query tokens per row (speculative verification), scattered blocks."""
    pytest.importorskip("triton")
    from llama import paged_attention as pa
    gen = torch.Generator().manual_seed(0)
    b, h, kvh, t, d, nb = 3, 8, 2, 3, 16, 24
    q = torch.randn(b, h, t, d, generator=gen)
    kp, vp = torch.randn(nb, BLOCK, kvh, d, generator=gen), torch.randn(nb, BLOCK, kvh, d, generator=gen)
    tables = _shuffled_tables(b, 5, nb, seed=3)
    positions = torch.tensor([[2, 3, 4], [9, 10, 11], [17, 18, 19]])
    got = pa.paged_attention(q, kp, vp, tables, positions)
    assert (got - pa.paged_attention_reference(q, kp, vp, tables, positions)).abs().max().item() <= 1e-5


def test_model_decodes_through_the_paged_kernel():
    """The whole model with attention read in place by the kernel equals the full forward."""
    pytest.importorskip("triton")
    from llama import paged_attention as pa
    small = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=100, intermediate_size=64,
                        max_seq_len=32)
    model = make_model(small, seed=3)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 100, (n,), generator=gen) for n in (6, 9)]
    cache = PagedKVCache(small, num_blocks=16, block_size=BLOCK)
    cache.use_kernel = True
    batched = _mixed_lengths_batch(model, cache, _shuffled_tables(2, 3, 16, seed=2), seqs, chunk=None)
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            assert (batched[i] - model(seq[None])[0, -1]).abs().max().item() <= 1e-5


def test_eager_attention_equals_sdpa_with_grouped_heads():
    """The CPU decode path (matmul-softmax-matmul, GQA heads folded into rows) against PyTorch's SDPA."""
    import torch.nn.functional as F

    from llama.model import eager_attention, sdpa
    gen = torch.Generator().manual_seed(3)
    b, h, hkv, t, s, d = 5, 8, 2, 3, 11, 16
    q = torch.randn(b, h, t, d, generator=gen)
    k, v = torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    pos = torch.randint(t - 1, s, (b,), generator=gen)[:, None] - torch.arange(t - 1, -1, -1)[None]
    mask = (torch.arange(s)[None, None, :] <= pos[:, :, None])[:, None]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                         attn_mask=mask)
    assert (eager_attention(q, k, v, mask) - ref).abs().max().item() <= 1e-5
    assert (sdpa(q, k, v, mask) - ref).abs().max().item() <= 1e-5  # grouped heads without a repeat
    half = eager_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()
    assert (half - ref).abs().max().item() <= 0.05


def test_bf16_batched_decode_takes_the_eager_path_and_matches_fp32():
    """Eight rows decoded together in bf16 (the eager attention path) give fp32's logits within
    bf16 rounding, and the same greedy tokens."""
    from llama.model import _eager_attention_pays
    model = make_model(CFG, seed=5)
    half = make_model(CFG, seed=5).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, 300, (8, 10), generator=gen)
    tables, pos = _shuffled_tables(8, 3, 32, seed=1), torch.full((8, 1), 9)
    assert _eager_attention_pays(torch.zeros(8, 8, 1, 8, dtype=torch.bfloat16))
    out = []
    with torch.no_grad():
        for m, dtype in ((model, torch.float32), (half, torch.bfloat16)):
            cache = PagedKVCache(CFG, num_blocks=32, block_size=BLOCK, dtype=dtype)
            cache.bind(tables, torch.arange(9).expand(8, 9))
            m(seqs[:, :9], torch.arange(9).expand(8, 9), cache)
            cache.bind(tables, pos)
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


def test_fused_projections_equal_separate_ones():
    """q/k/v and gate/up fused at load (the GPU runner's model) give the same logits, LoRA included."""
    from llama.model import fuse_projections
    from llama.multi_lora import attach_multi_lora, set_rows
    model = make_model(CFG, seed=6)
    layers = attach_multi_lora(model, slots=1, max_rank=4)
    with torch.no_grad():
        for layer in layers.values():
            layer.A[:4, 1].normal_(0, 0.1)
            layer.B[:4, 1].normal_(0, 0.1)
            layer.loaded.add(1)
        rows = next(iter(layers.values())).rows
        rows.scaling[1], rows.ranks[1], rows.r_eff = 2.0, 4, 4
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    set_rows(layers, torch.tensor([0, 1]))
    with torch.no_grad():
        ref = model(tokens)
        fuse_projections(model)
        assert hasattr(model.layers[0].attention, "wqkv") and not hasattr(model.layers[0].attention, "wq")
        got = model(tokens)
    assert (got - ref).abs().max().item() <= 1e-5
    assert (ref[1] - ref[0]).abs().max().item() > 1e-3  # the adapter acted on row 1
