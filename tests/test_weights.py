"""HF safetensors round trips (single and sharded) and Meta-layout import."""

import json

import pytest
import torch

from conftest import make_model
from llama.config import LlamaConfig
from llama.meta_format import hf_to_meta_rotary, load_meta_checkpoint, meta_to_hf_rotary, save_meta_checkpoint
from llama.weights import INDEX_FILE, SINGLE_FILE, load_model, save_model

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, intermediate_size=176,
                  max_seq_len=128)
TOKENS = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(5))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(TOKENS), b(TOKENS))


def test_single_file_round_trip(tmp_path):
    model = make_model(CFG, seed=1)
    save_model(model, tmp_path)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    _same(model, load_model(tmp_path))


def test_sharded_round_trip(tmp_path):
    model = make_model(CFG, seed=1)
    save_model(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / SINGLE_FILE).exists()
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    _same(model, load_model(tmp_path))


def test_bf16_load(tmp_path):
    save_model(make_model(CFG), tmp_path)
    assert load_model(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


def test_rotary_permutation_inverts():
    w = torch.randn(CFG.n_heads * CFG.head_dim, CFG.dim)
    assert torch.equal(meta_to_hf_rotary(hf_to_meta_rotary(w, CFG.n_heads), CFG.n_heads), w)
    assert not torch.equal(hf_to_meta_rotary(w, CFG.n_heads), w)


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_checkpoint_imports_to_identical_logits(tmp_path, mp):
    model = make_model(CFG, seed=9)
    save_meta_checkpoint(CFG, model.state_dict(), tmp_path, model_parallel=mp)
    files = sorted(p.name for p in tmp_path.glob("consolidated.*.pth"))
    assert files == [f"consolidated.{i:02d}.pth" for i in range(mp)]
    shard0 = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wq.weight"].shape[0] == CFG.dim // mp  # really split
    assert shard0["tok_embeddings.weight"].shape[1] == CFG.dim // mp
    cfg, state = load_meta_checkpoint(tmp_path)
    assert cfg == CFG.model_copy(update={"max_seq_len": 4096})
    imported = make_model(cfg)
    imported.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(imported(TOKENS), model(TOKENS))


def test_meta_rotary_permutation_is_what_meta_math_needs(tmp_path):
    """Meta's interleaved complex RoPE on Meta-layout q equals our half-split RoPE on HF-layout q."""
    from llama.model import apply_rope, rope_cos_sin, rope_inv_freq
    hd, t = 16, 10
    x = torch.randn(1, t, 64)
    wq_hf = torch.randn(4 * hd, 64)
    wq_meta = hf_to_meta_rotary(wq_hf, 4)
    # Meta reference: view_as_complex over adjacent pairs, multiply by polar(1, pos * freq).
    freqs = torch.outer(torch.arange(t).float(), rope_inv_freq(hd, 10000.0))
    cis = torch.polar(torch.ones_like(freqs), freqs)
    qm = (x @ wq_meta.T).view(1, t, 4, hd)
    qm = torch.view_as_real(torch.view_as_complex(qm.reshape(1, t, 4, hd // 2, 2)) * cis[None, :, None])
    qm = qm.reshape(1, t, 4, hd)
    cos, sin = rope_cos_sin(rope_inv_freq(hd, 10000.0), torch.arange(t)[None], torch.float32)
    qh = apply_rope((x @ wq_hf.T).view(1, t, 4, hd).transpose(1, 2), cos, sin).transpose(1, 2)
    # Same scores: q.k is invariant to the (shared) channel order within a head.
    assert torch.allclose(qm @ qm.transpose(-1, -2), qh @ qh.transpose(-1, -2), atol=1e-4)
    assert torch.allclose(meta_to_hf_rotary(qm.reshape(t, -1).T.contiguous(), 4).T.reshape(1, t, 4, hd), qh, atol=1e-5)
