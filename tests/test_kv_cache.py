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
