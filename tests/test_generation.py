"""Generation: greedy equals transformers' generate; sampling is seeded; stops and limits."""

import pytest
import torch

from conftest import make_model, to_hf
from llama.config import LlamaConfig
from llama.generation import SamplingParams, generate
from llama.sampler import SamplingBatch, sample, uniform_noise

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


def _settings(rows: int, temperature=1.0, top_p=1.0, top_k=0, seed=0, offset=0) -> SamplingBatch:
    return SamplingBatch([temperature] * rows, [top_p] * rows, [top_k] * rows,
                         [seed + i for i in range(rows)], [offset] * rows)


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    assert sample(logits, _settings(4, top_k=1)).tolist() == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    seen = {int(sample(logits, _settings(1, top_p=0.5, offset=i))) for i in range(50)}
    assert seen == {0}
    seen = {int(sample(logits, _settings(1, top_p=0.85, offset=i))) for i in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    """Gumbel-max over the counter-based noise is a sample of softmax(logits / T)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = (probs.log() * 2.0).expand(4000, 4)  # temperature 2 undoes the factor 2
    picks = sample(logits, _settings(4000, temperature=2.0, seed=123))
    freq = torch.bincount(picks, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_each_row_samples_on_its_own_seed_whatever_the_batch():
    logits = torch.randn(3, 100)
    alone = [int(sample(logits[i:i + 1], SamplingBatch([0.8], [0.9], [20], [s], [5])))
             for i, s in enumerate([7, 8, 9])]
    batched = sample(logits, SamplingBatch([0.8, 0.8, 0.8], [0.9] * 3, [20] * 3, [7, 8, 9], [5] * 3))
    assert batched.tolist() == alone
    mixed = sample(logits, SamplingBatch([0.0, 0.8, 0.0], [1.0, 0.9, 1.0], [0, 20, 0], [0, 8, 0], [5] * 3))
    assert mixed.tolist() == [int(logits[0].argmax()), alone[1], int(logits[2].argmax())]


def test_noise_is_uniform_and_depends_on_seed_and_offset():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 5000)
    assert 0 < u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.02
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(u[0], uniform_noise(torch.tensor([1]), torch.tensor([0]), 5000)[0])


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
