"""The serving path on a GPU: skipped where there is none (CI), run by `pytest tests/test_cuda.py` on one.

The same logic runs on CPU in the rest of the suite; these check what only CUDA exercises: the
runner's CUDA graphs, fused projections and compiled elementwise kernels, and the Triton paged
attention compiled for the device (on CPU it runs in Triton's interpreter)."""

import queue

import pytest
import torch

from conftest import make_model
from llama.config import preset
from llama.generation import SamplingParams, generate
from llama.sampler import SamplingBatch
from llama.tokenizer import Tokenizer
from serving.engine import Engine, FinishEvent, Request
from serving.runner import LocalRunner, StepBatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
CFG = preset("tiny")


def _greedy(engine, prompts, n=24):
    queues = []
    for p in prompts:
        q = queue.Queue()
        engine.submit(Request(p, SamplingParams(max_tokens=n, ignore_eos=True), q.put))
        queues.append(q)
    out = []
    for q in queues:
        ev = q.get(timeout=300)
        while not isinstance(ev, FinishEvent):
            ev = q.get(timeout=300)
        out.append(ev.token_ids)
    return out


def test_engine_on_cuda_gives_the_eager_reference_tokens(tokenizer_path):
    prompts = [[1, 5, 6, 7], [1, 40, 41], [1] + list(range(100, 130))]
    runner = LocalRunner(make_model(CFG, seed=1).cuda(), slots=4, max_loras=0, max_lora_rank=8)
    engine = Engine(runner, Tokenizer(tokenizer_path), slots=4, speculate_tokens=0)
    got = _greedy(engine, prompts)
    engine.shutdown()
    assert runner.stats["graph_steps"] > 0  # decode really replayed graphs
    for p, tokens in zip(prompts, got):
        ref = generate(make_model(CFG, seed=1), p, SamplingParams(max_tokens=24, ignore_eos=True), eos_id=-1)
        assert tokens == ref.token_ids


def test_graph_decode_equals_eager_decode():
    graphs = LocalRunner(make_model(CFG, seed=2).cuda(), slots=8, max_loras=0, max_lora_rank=8)
    eager = LocalRunner(make_model(CFG, seed=2).cuda(), slots=8, max_loras=0, max_lora_rank=8, cuda_graphs=False)
    rows = 5
    tables = [[1 + 4 * i + j for j in range(4)] for i in range(rows)]
    greedy = SamplingBatch([0.0] * rows, [1.0] * rows, [0] * rows, [0] * rows, [0] * rows)
    prompts = [[1] + list(range(10 + i, 20 + 2 * i)) for i in range(rows)]
    for runner in (graphs, eager):
        runner.execute(StepBatch(prompts, [0] * rows, tables, [0] * rows, greedy))
    tokens = {id(r): [[p[-1]] for p in prompts] for r in (graphs, eager)}
    for step in range(10):
        for runner in (graphs, eager):
            starts = [len(p) - 1 + step for p in prompts]
            out = runner.execute(StepBatch(tokens[id(runner)], starts, tables, [0] * rows, greedy))
            tokens[id(runner)] = [[t] for t in out.sampled]
        assert tokens[id(graphs)] == tokens[id(eager)]
    assert graphs.stats["graph_steps"] == 10 and eager.stats["graph_steps"] == 0
