"""Generation: greedy equals transformers' generate; sampling is seeded; stops and limits."""

import pytest
import torch

from conftest import make_model, to_hf
from llama.config import LlamaConfig
from llama.generation import SamplingParams, generate, sample_next

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, intermediate_size=176,
                  max_seq_len=128)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = make_model(CFG, seed=7)
    return model, to_hf(model, tmp_path_factory.mktemp("gen"))


@pytest.mark.parametrize("prompt", [[1], [1, 17, 45, 200, 3, 99, 4, 250]])
def test_greedy_matches_transformers_generate(pair, prompt):
    ours, hf = pair
    out = generate(ours, prompt, SamplingParams(max_tokens=40), eos_id=-1)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    assert out.token_ids == ref[0, len(prompt):].tolist()
    assert out.finish_reason == "length"


def test_seeded_sampling_is_repeatable_and_varies_with_seed(pair):
    ours, _ = pair
    p = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=11)
    a = generate(ours, [1, 5, 6], p, eos_id=-1).token_ids
    b = generate(ours, [1, 5, 6], p, eos_id=-1).token_ids
    c = generate(ours, [1, 5, 6], SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=12),
                 eos_id=-1).token_ids
    assert a == b
    assert a != c


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    picked = sample_next(logits, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert picked.tolist() == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.5, generator=gen)) for _ in range(50)}
    assert seen == {0}
    seen = {int(sample_next(logits, 1.0, top_p=0.85, generator=gen)) for _ in range(200)}
    assert seen == {0, 1}


def test_stops_at_stop_token_and_excludes_it(pair):
    ours, _ = pair
    free = generate(ours, [1, 5], SamplingParams(max_tokens=20), eos_id=-1).token_ids
    stop = free[5]
    first = free.index(stop)
    out = generate(ours, [1, 5], SamplingParams(max_tokens=20, stop_ids=(stop,)), eos_id=-1)
    assert out.token_ids == free[:first]
    assert out.finish_reason == "stop"


def test_max_tokens_capped_by_context_window(pair):
    ours, _ = pair
    prompt = [1] * (CFG.max_seq_len - 3)
    out = generate(ours, prompt, SamplingParams(max_tokens=50), eos_id=-1)
    assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="context window"):
        generate(ours, [1] * CFG.max_seq_len, SamplingParams(max_tokens=1))


def test_bad_sampling_params_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
