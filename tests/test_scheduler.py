"""Scheduling over the paged cache: preemption, chunked prefill, admission by blocks, sampling parity."""

import queue

import torch

from conftest import make_model
from llama.config import preset
from llama.generation import SamplingParams, generate
from llama.tokenizer import Tokenizer
from serving.engine import Engine, FinishEvent, Request, TokenEvent
from serving.kv_blocks import BlockPool, plan_num_blocks
from serving.runner import LocalRunner

CFG = preset("tiny")


def _run_all(engine, jobs):
    """Submit (prompt, params) jobs at once; return each one's events."""
    queues = []
    for prompt, params in jobs:
        q = queue.Queue()
        engine.submit(Request(prompt, params, q.put))
        queues.append(q)
    out = []
    for q in queues:
        events = []
        while not isinstance(events[-1] if events else None, FinishEvent):
            events.append(q.get(timeout=120))
        out.append(events)
    return out


def _jobs(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n):
        prompt = [1] + torch.randint(3, CFG.vocab_size, (4 + 3 * i,), generator=gen).tolist()
        temperature = 0.0 if i % 2 == 0 else 0.9
        jobs.append((prompt, SamplingParams(max_tokens=40, temperature=temperature, top_p=0.95, seed=100 + i)))
    return jobs


def test_preemption_and_readmission_give_the_same_tokens(tokenizer_path):
    """A pool far too small for six requests at once preempts and recomputes; greedy and seeded
    sampling rows still produce exactly what they produce with room to spare."""
    tok = Tokenizer(tokenizer_path)
    outputs = {}
    for blocks in (None, 9):  # 8 usable blocks of 16 tokens: about two requests at a time
        runner = LocalRunner(make_model(CFG, seed=1), slots=6, max_loras=0, max_lora_rank=8, num_blocks=blocks)
        engine = Engine(runner, tok, slots=6, speculate_tokens=0)
        events = _run_all(engine, _jobs())
        outputs[blocks] = [e[-1].token_ids for e in events]
        stats = dict(engine.scheduler.stats)
        assert engine.pool.used == 0  # every block came back
        for e in events:  # the streamed text is the final text, preemption or not
            assert "".join(x.text for x in e if isinstance(x, TokenEvent)) == e[-1].text
        engine.shutdown()
        if blocks:
            assert stats["preemptions"] > 0
    assert outputs[9] == outputs[None]


def test_long_prompt_is_prefilled_in_chunks_beside_running_decodes(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    runner = LocalRunner(make_model(CFG, seed=1), slots=4, max_loras=0, max_lora_rank=8)
    engine = Engine(runner, tok, slots=4, speculate_tokens=0, prefill_chunk=16)
    short = ([1, 5, 6, 7], SamplingParams(max_tokens=30))
    long_prompt = [1] + torch.randint(3, CFG.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = []
    real = runner.execute
    runner.execute = lambda batch: calls.append([len(t) for t in batch.tokens]) or real(batch)
    q = queue.Queue()
    engine.submit(Request(*short, q.put))
    q.get(timeout=60)  # the short request is decoding
    events = _run_all(engine, [(long_prompt, SamplingParams(max_tokens=5))])
    assert max(max(c) for c in calls) <= 16  # no forward saw more than one chunk of the prompt
    assert sum(1 for c in calls if c == [16]) >= 5  # the 101-token prompt took several chunk passes
    ref = generate(make_model(CFG, seed=1), long_prompt, SamplingParams(max_tokens=5), eos_id=2).token_ids
    assert events[0][-1].token_ids == ref
    # a long and a short prompt arriving together: one padded pass stays within the chunk's cells
    calls.clear()
    engine.scheduler.prefill_chunk = 32
    both = _run_all(engine, [(long_prompt, SamplingParams(max_tokens=5)), ([1, 9, 8, 7], SamplingParams(max_tokens=5))])
    prefill_passes = [c for c in calls if max(c) > 1]
    assert prefill_passes and all(len(c) * max(c) <= 32 for c in prefill_passes)
    assert both[0][-1].token_ids == ref
    engine.shutdown()


def test_engine_samples_the_same_tokens_as_generate_for_a_seed(tokenizer_path):
    """`herd generate` and the serving engine share the sampler: same seed, same tokens, even when the
    request shares its batch with others."""
    tok = Tokenizer(tokenizer_path)
    runner = LocalRunner(make_model(CFG, seed=1), slots=4, max_loras=0, max_lora_rank=8)
    engine = Engine(runner, tok, slots=4, speculate_tokens=0)
    params = SamplingParams(max_tokens=25, temperature=0.8, top_p=0.9, top_k=50, seed=42)
    prompt = [1, 40, 41, 42]
    others = [([1, 7, 8, 9, 10], SamplingParams(max_tokens=25, temperature=1.0, seed=s)) for s in (1, 2)]
    events = _run_all(engine, [(prompt, params)] + others)
    ref = generate(make_model(CFG, seed=1), prompt, params, eos_id=tok.eos_id).token_ids
    assert events[0][-1].token_ids == ref
    assert events[0][-1].token_ids != events[1][-1].token_ids
    engine.shutdown()


def test_admission_waits_for_blocks_and_the_pool_is_sized_from_memory():
    cfg = preset("tiny")
    pool = BlockPool(num_blocks=5, block_size=16)
    assert pool.needed([], 33) == 3 and pool.needed([7], 33) == 2 and pool.needed([7, 8, 9], 33) == 0
    taken = pool.take(3)
    assert pool.free == 1 and pool.used == 3 and 0 not in taken
    pool.give_back(taken)
    assert pool.free == 4
    per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * 16
    got = plan_num_blocks(cfg, torch.float32, torch.device("cpu"), 16, 4, 256, kv_cache_gib=per_block * 40 / 2**30)
    assert got == 40
    # CPU default: every slot can reach the full context
    assert plan_num_blocks(cfg, torch.float32, torch.device("cpu"), 16, 4, 256) == 4 * 16 + 1
    import pytest
    with pytest.raises(ValueError, match="max-seq-len"):
        plan_num_blocks(cfg, torch.float32, torch.device("cpu"), 16, 4, 256, kv_cache_gib=per_block * 5 / 2**30)
