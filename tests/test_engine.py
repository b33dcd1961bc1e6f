"""The batching engine: continuous batching with per-row LoRA equals one-at-a-time generation."""

import queue

import pytest
import torch
from adapters import random_adapter
from conftest import make_model
from llama.config import preset
from llama.generation import SamplingParams, generate
from llama.lora import apply_lora, load_adapter
from llama.multi_lora import attach_multi_lora, load_into_slot, set_rows
from llama.tokenizer import Tokenizer
from serving.engine import Engine, ErrorEvent, FinishEvent, Request, TokenEvent
from serving.runner import LocalRunner
from serving.speculation import prompt_lookup_draft

CFG = preset("tiny")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (r, targets) in enumerate([(4, ("q_proj", "v_proj")), (8, ("k_proj", "o_proj", "down_proj")),
                                      (2, ("q_proj", "gate_proj", "up_proj"))]):
        random_adapter(root / f"a{i}", CFG, r=r, alpha=2 * r, targets=targets, seed=10 + i)
        out[(f"a{i}", "v1")] = load_adapter(root / f"a{i}", CFG)
    return out


def _engine(tokenizer_path, adapters, slots=8, max_loras=3):
    runner = LocalRunner(make_model(CFG, seed=1), slots=slots, max_loras=max_loras, max_lora_rank=8)
    return Engine(runner, Tokenizer(tokenizer_path), slots=slots, max_loras=max_loras,
                  adapter_loader=lambda key: adapters[key])


def _collect(engine, prompt, params, adapter=None, stop=()):
    q = queue.Queue()
    req = engine.submit(Request(prompt, params, q.put, stop_strings=stop, adapter=adapter))
    return req, q


def _wait(q, timeout=60):
    events = []
    while True:
        ev = q.get(timeout=timeout)
        events.append(ev)
        if isinstance(ev, (FinishEvent, ErrorEvent)):
            return events


def test_multi_lora_layer_equals_single_lora(adapters):
    base = make_model(CFG, seed=1)
    x = torch.randint(0, CFG.vocab_size, (3, 9))
    singles = []
    for row, key in enumerate([("a0", "v1"), ("a1", "v1"), None]):
        m = make_model(CFG, seed=1)
        if key:
            apply_lora(m, *adapters[key])
        with torch.no_grad():
            singles.append(m(x[row:row + 1]))
    layers = attach_multi_lora(base, slots=3, max_rank=8)
    load_into_slot(layers, 1, *adapters[("a0", "v1")])
    load_into_slot(layers, 2, *adapters[("a1", "v1")])
    set_rows(layers, torch.tensor([1, 2, 0]))
    with torch.no_grad():
        batched = base(x)
    for i in range(3):
        assert (batched[i:i + 1] - singles[i]).abs().max().item() <= 1e-5


def test_concurrent_mixed_adapters_equal_single_requests(tokenizer_path, adapters):
    engine = _engine(tokenizer_path, adapters)
    gen = torch.Generator().manual_seed(3)
    jobs = []
    keys = [None, ("a0", "v1"), ("a1", "v1"), ("a2", "v1")] * 2
    for i, key in enumerate(keys):
        prompt = [1] + torch.randint(3, CFG.vocab_size, (3 + 5 * i,), generator=gen).tolist()
        jobs.append((prompt, key, 5 + 3 * i))
    handles = [_collect(engine, p, SamplingParams(max_tokens=n), adapter=k) for p, k, n in jobs]
    results = [_wait(q) for _, q in handles]
    assert engine.stats["decode_rows"] > engine.stats["decode_steps"]  # requests really shared batches
    for (prompt, key, n), events in zip(jobs, results):
        ref_model = make_model(CFG, seed=1)
        if key:
            apply_lora(ref_model, *adapters[key])
        ref = generate(ref_model, prompt, SamplingParams(max_tokens=n), eos_id=2).token_ids
        finish = events[-1]
        assert isinstance(finish, FinishEvent) and finish.token_ids == ref, (key, finish.token_ids, ref)
        assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == finish.text
    snap = engine.snapshot()
    assert snap["running"] == 0 and snap["free_slots"] == 8
    engine.shutdown()


def test_lru_eviction_never_evicts_a_busy_adapter(tokenizer_path, adapters):
    keys = [("a0", "v1"), ("a1", "v1"), ("a2", "v1")]
    alone = _engine(tokenizer_path, adapters, max_loras=3)  # room for all: each request on its own
    expected = [_wait(_collect(alone, [1, 5, 6], SamplingParams(max_tokens=30), adapter=k)[1])[-1].token_ids
                for k in keys]
    alone.shutdown()
    assert len({tuple(t) for t in expected}) == 3  # the adapters really answer differently
    engine = _engine(tokenizer_path, adapters, max_loras=2)
    handles = [_collect(engine, [1, 5, 6], SamplingParams(max_tokens=30), adapter=k) for k in keys]
    results = [_wait(q) for _, q in handles]
    assert all(isinstance(r[-1], FinishEvent) and r[-1].completion_tokens > 0 for r in results)
    # each answer comes from its own adapter: none was swapped out under a running request
    assert [r[-1].token_ids for r in results] == expected
    assert len(engine.snapshot()["resident_adapters"]) == 2
    assert "a2@v1" in engine.snapshot()["resident_adapters"]  # loaded after a slot freed up
    engine.shutdown()


class NoEosRunner(LocalRunner):
    """A runner that never lets EOS win, so a request keeps its slot as long as the test needs."""

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        logits[..., 2] = float("-inf")
        return logits


def test_cancel_frees_the_slot(tokenizer_path, adapters):
    tok = Tokenizer(tokenizer_path)
    runner = NoEosRunner(make_model(CFG, seed=1), slots=2, max_loras=0, max_lora_rank=8)
    engine = Engine(runner, tok, slots=2)
    limit = CFG.max_seq_len - 8
    req, q = _collect(engine, [1, 5, 6], SamplingParams(max_tokens=limit))
    q.get(timeout=30)  # first token arrived: it is running
    engine.cancel(req)
    events = _wait(q)
    assert events[-1].reason == "cancelled" and events[-1].completion_tokens < limit
    assert engine.snapshot() == {**engine.snapshot(), "running": 0, "free_slots": 2}
    engine.shutdown()


def test_stop_strings_and_limits(tokenizer_path, adapters):
    engine = _engine(tokenizer_path, adapters)
    _, q = _collect(engine, [1, 5, 6, 7], SamplingParams(max_tokens=40))
    full = _wait(q)[-1]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip()
    _, q = _collect(engine, [1, 5, 6, 7], SamplingParams(max_tokens=40), stop=(stop,))
    events = _wait(q)
    assert events[-1].reason == "stop" and events[-1].text == full.text[: full.text.find(stop)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == events[-1].text
    with pytest.raises(ValueError, match="context window"):
        engine.submit(Request([1] * CFG.max_seq_len, SamplingParams(), print))
    engine.shutdown()


def test_seeded_sampling_is_per_request(tokenizer_path, adapters):
    engine = _engine(tokenizer_path, adapters)
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=5)
    outs = [_wait(_collect(engine, [1, 9, 9], p)[1])[-1].token_ids for _ in range(2)]
    # two concurrent copies of the same seeded request still agree
    handles = [_collect(engine, [1, 9, 9], p) for _ in range(3)]
    outs += [_wait(q)[-1].token_ids for _, q in handles]
    assert all(o == outs[0] for o in outs)
    engine.shutdown()


def test_overload_is_refused_not_queued_forever(tokenizer_path, adapters):
    runner = NoEosRunner(make_model(CFG, seed=1), slots=1, max_loras=0, max_lora_rank=8)
    engine = Engine(runner, Tokenizer(tokenizer_path), slots=1, max_waiting=1)
    first, q1 = _collect(engine, [1, 5], SamplingParams(max_tokens=400))
    q1.get(timeout=30)  # running in the only slot
    _collect(engine, [1, 6], SamplingParams(max_tokens=4))  # waits
    with pytest.raises(Engine.Overloaded, match="already waiting"):
        engine.submit(Request([1, 7], SamplingParams(max_tokens=4), print))
    engine.cancel(first)
    engine.shutdown()


def test_prompt_lookup_speculation_is_exact(tokenizer_path, adapters):
    """Greedy rows verify drafted tokens; the output equals plain decoding, in fewer steps."""
    prompt = [1] + [17, 33, 51, 17, 33, 51, 17, 33] * 3
    outputs = {}
    for k in (0, 4):
        runner = LocalRunner(make_model(CFG, seed=1), slots=4, max_loras=3, max_lora_rank=8)
        engine = Engine(runner, Tokenizer(tokenizer_path), slots=4, max_loras=3, speculate_tokens=k,
                        adapter_loader=lambda key: adapters[key])
        handles = [_collect(engine, prompt, SamplingParams(max_tokens=60), adapter=a) for a in (None, ("a1", "v1"))]
        outputs[k] = ([_wait(q)[-1].token_ids for _, q in handles], dict(engine.stats))
        engine.shutdown()
    assert outputs[4][0] == outputs[0][0]
    ref = generate(make_model(CFG, seed=1), prompt, SamplingParams(max_tokens=60), eos_id=2).token_ids
    assert outputs[4][0][0] == ref
    stats = outputs[4][1]
    assert stats["draft_accepted"] > 0 and stats["decode_steps"] < outputs[0][1]["decode_steps"]


def test_draft_reads_a_repeating_tail_cyclically():
    """A match that overlaps the tail still drafts a full window: the text is taken to repeat with
    the match's period (a run of one token, a loop of three)."""
    assert prompt_lookup_draft([1, 9, 4, 7, 7, 7], 8) == [7] * 8
    assert prompt_lookup_draft([1, 5, 6, 8, 5, 6, 8, 5], 8) == [6, 8, 5, 6, 8, 5, 6, 8]
    assert prompt_lookup_draft([1, 5, 6, 8, 2, 3], 8) == []  # nothing to copy


def test_grouped_lora_equals_per_row_lora():
    """The grouped multi-LoRA product (every resident adapter's A x in one matmul, each row keeping its
    own columns) equals applying each row's adapter on its own: s * B_i (A_i x)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=False)
    from llama.multi_lora import LoraRows, MultiLoraLinear
    rows = LoraRows(slots=3, max_rank=6, dtype=torch.float32, device="cpu")
    layer = MultiLoraLinear(base, rows, max_rank=6)
    ranks, scales = {1: 6, 2: 2, 3: 4}, {1: 0.5, 2: 2.0, 3: 1.5}
    mats = {}
    with torch.no_grad():
        for slot, r in ranks.items():
            a, b = torch.randn(r, 24), torch.randn(40, r)
            mats[slot] = (a, b)
            layer.A[:r, slot] = a
            layer.B[:r, slot] = b.T
            layer.loaded.add(slot)
            rows.scaling[slot], rows.ranks[slot] = scales[slot], r
        rows.r_eff = max(rows.ranks)
        slots = torch.tensor([2, 0, 1, 3, 2, 1])
        set_rows({"x": layer}, slots)
        x = torch.randn(6, 5, 24)
        got = layer(x)
        for i, slot in enumerate(slots.tolist()):
            want = base(x[i])
            if slot:
                a, b = mats[slot]
                want = want + scales[slot] * (x[i] @ a.T) @ b.T
            assert (got[i] - want).abs().max().item() <= 1e-5


def test_streamed_text_is_exact_for_multibyte_characters(tokenizer_path):
    """Byte-fallback pieces (accents, CJK, emoji) stream as whole characters: the deltas joined equal
    the final text and no delta carries a replacement character."""
    from serving.detokenizer import IncrementalDetokenizer
    tok = Tokenizer(tokenizer_path)
    text = "Perché è così? città 😀 fine 東京 ünïcödé"
    ids = tok.encode(text, bos=False)
    for stops in ((), ("ci",), ("😀 f",)):
        d = IncrementalDetokenizer(tok, stops)
        deltas = []
        for t in ids:
            d.add(t)
            deltas.append(d.take())
            if d.stopped:
                break
        d.finish()
        deltas.append(d.take(final=True))
        assert all("\ufffd" not in x for x in deltas)
        assert "".join(deltas) == d.text
        full = tok.decode(ids)
        assert d.text == (full[: min(full.find(s) for s in stops)] if stops else full)


def test_detokenizing_costs_a_bounded_number_of_tokens_per_token(tokenizer_path):
    """Over a 4,096-token output each token is decoded a small constant number of times (counted)."""
    from serving.detokenizer import IncrementalDetokenizer
    tok = Tokenizer(tokenizer_path)
    ids = (tok.encode("In the beginning God created the heaven and the earth. è 😀 ", bos=False) * 400)[:4096]
    d = IncrementalDetokenizer(tok, ("never appears",))
    for t in ids:
        d.add(t)
        d.take()
    assert d.text == tok.decode(ids)
    assert d.decoded_tokens / len(ids) < 12


def test_adapter_download_does_not_stall_decoding(tokenizer_path, adapters):
    """While one adapter's fetch is held for 3 s, a running request keeps getting tokens and the
    engine keeps answering; the waiting request is served once the fetch completes."""
    import threading
    import time
    release = threading.Event()

    def slow_loader(key):
        release.wait(timeout=30)
        return adapters[key]
    runner = NoEosRunner(make_model(CFG, seed=1), slots=4, max_loras=2, max_lora_rank=8)
    engine = Engine(runner, Tokenizer(tokenizer_path), slots=4, max_loras=2, adapter_loader=slow_loader,
                    speculate_tokens=0)
    running, q1 = _collect(engine, [1, 5, 6], SamplingParams(max_tokens=4000))
    q1.get(timeout=60)
    _, q2 = _collect(engine, [1, 7, 8], SamplingParams(max_tokens=5), adapter=("a0", "v1"))
    steps_before = engine.stats["decode_steps"]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert engine.snapshot()["waiting"] == 1  # answers at once: the lock is not held by the fetch
        time.sleep(0.1)
    assert engine.stats["decode_steps"] > steps_before + 5  # decoding went on during the fetch
    release.set()
    assert isinstance(_wait(q2)[-1], FinishEvent)
    engine.cancel(running)
    _wait(q1)
    engine.shutdown()


def test_runner_failures_make_the_engine_unhealthy(tokenizer_path):
    class Broken(LocalRunner):
        def execute(self, batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    engine = Engine(Broken(make_model(CFG, seed=1), slots=2, max_loras=0, max_lora_rank=8),
                    Tokenizer(tokenizer_path), slots=2)
    assert engine.health() is None
    for _ in range(3):
        _, q = _collect(engine, [1, 5], SamplingParams(max_tokens=3))
        ev = _wait(q)[-1]
        assert isinstance(ev, ErrorEvent) and "illegal memory access" in ev.message
    assert "failed 3 steps in a row" in engine.health()
    engine.shutdown()
