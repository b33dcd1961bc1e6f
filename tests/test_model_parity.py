"""Our model against transformers' LlamaForCausalLM on the same random weights (fp32)."""

import pytest
import torch

from conftest import make_model, to_hf
from llama.config import LlamaConfig

CONFIGS = {
    "multi-head": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300,
                              intermediate_size=176, max_seq_len=256),
    "gqa-70b-like": LlamaConfig(dim=128, n_layers=2, n_heads=16, n_kv_heads=2, vocab_size=300,
                                intermediate_size=352, max_seq_len=256),
    "codellama-theta": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300,
                                   intermediate_size=176, rope_theta=1e6, max_seq_len=16384),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    model = make_model(CONFIGS[request.param], seed=3)
    return model, to_hf(model, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("seq_len", [1, 97])
def test_logits_match_transformers(pair, seq_len):
    ours, hf = pair
    tokens = torch.randint(0, ours.cfg.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5, f"max abs logit diff {diff}"


def test_gqa_config_really_groups_heads():
    cfg = CONFIGS["gqa-70b-like"]
    assert cfg.n_heads // cfg.n_kv_heads == 8
    model = make_model(cfg)
    assert model.layers[0].attention.wk.weight.shape == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)


def test_bf16_runs_close_to_fp32():
    model = make_model(CONFIGS["multi-head"], seed=1)
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens)
    assert low.dtype == torch.float32  # logits always come back in fp32
    assert (low - ref).abs().max().item() < 0.05
    assert model.inv_freq.dtype == torch.float32  # rotary frequencies never rounded to bf16
