"""Tensor parallelism: sharded forward == full forward; TP=2 replicas (Ray actors, Serve) == TP=1."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from adapters import random_adapter
from clirun import herd, herd_json
from cluster.local_inference import generate_text
from cluster.models import create_tiny_model, load_base, load_config
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage
from llama.config import LlamaConfig
from llama.generation import SamplingParams
from llama.lora import load_adapter
from llama.multi_lora import attach_multi_lora, load_into_slot, set_rows
from llama.tensor_parallel import load_shard, wrap_row_parallel
from llama.weights import save_model

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=300, intermediate_size=160,
                  max_seq_len=128)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank, world, port, model_dir, adapter_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = load_shard(model_dir, rank, world)
    layers = attach_multi_lora(model, slots=2, max_rank=8)
    load_into_slot(layers, 1, *load_adapter(adapter_dir, CFG), tp_rank=rank, tp_world=world)
    wrap_row_parallel(model)
    set_rows(layers, torch.tensor([0, 1, 1]))
    tokens = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    shard_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
    if rank == 0:
        torch.save({"logits": logits, "shard_params": shard_params}, out)
    dist.destroy_process_group()


def test_sharded_forward_equals_full(tmp_path):
    from conftest import make_model
    from llama.lora import apply_lora
    full = make_model(CFG, seed=6)
    save_model(full, tmp_path / "m", max_shard_bytes=100_000)  # sharded files too
    random_adapter(tmp_path / "a", CFG, r=4, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))
    mp.start_processes(_shard_worker, args=(2, _port(), str(tmp_path / "m"), str(tmp_path / "a"),
                                            str(tmp_path / "out.pt")), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    tokens = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    tuned = apply_lora(make_model(CFG, seed=6), *load_adapter(tmp_path / "a", CFG))
    with torch.no_grad():
        ref_base, ref_tuned = full(tokens), tuned(tokens)
    assert (got["logits"][0] - ref_base[0]).abs().max().item() <= 1e-5
    assert (got["logits"][1:] - ref_tuned[1:]).abs().max().item() <= 1e-5
    layer_params = sum(p.numel() for n, p in full.named_parameters() if n.startswith("layers.") and "norm" not in n)
    assert got["shard_params"] < 0.6 * layer_params  # each rank holds about half of every layer


@pytest.fixture(scope="module")
def tp_storage(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    url = str(root / "storage")
    storage = open_storage(url)
    create_tiny_model(storage, "base", preset_name="tiny-mha")  # 4 heads, 4 KV heads: TP=2 divides both
    cfg = load_config(storage, "base")
    reg = AdapterRegistry(storage)
    reg.push(random_adapter(root / "a", cfg, r=4, alpha=32, targets=("q_proj", "v_proj", "o_proj", "down_proj")),
             "tpa")
    return url


@pytest.mark.usefixtures("ray_cluster")
def test_tp2_runner_matches_tp1(tp_storage):
    import ray
    from serving.engine import Engine
    from serving.runner import LocalRunner
    from serving.tensor_parallel import TPRunner
    ray.init(address=f"127.0.0.1:{os.environ['HERD_GCS_PORT']}", ignore_reinit_error=True,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    storage = open_storage(tp_storage)
    tp, tok = TPRunner.create(storage, "base", 2, slots=4, max_loras=2, max_lora_rank=8)
    try:
        model, _ = load_base(storage, "base")
        one = LocalRunner(model, slots=4, max_loras=2, max_lora_rank=8)
        spec_state = AdapterRegistry(storage).load("tpa")[3:]
        for runner in (tp, one):
            runner.load_adapter(1, *spec_state)
        from llama.sampler import SamplingBatch
        from serving.runner import StepBatch
        tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1)).tolist()
        # the argmax after every position (greedy verification) and a seeded sample, TP=2 against TP=1;
        # rank 0 sends back only ids (the shard logits equal the full model's: test_sharded_forward_equals_full)
        batch = StepBatch(tokens, [0, 0], [[1], [2]], [0, 1], SamplingBatch([0.0, 1.0], [1.0, 0.9], [0, 0], [0, 7],
                                                                          [0, 0]), verify=True)
        assert tp.num_blocks == one.num_blocks
        assert tp.channel is not None  # steps go through shared memory (the workers share this node)
        got, want = tp.execute(batch), one.execute(batch)
        assert got.picks == want.picks and got.sampled == want.sampled
        import queue
        outs = {}
        for name, runner in (("tp", tp), ("one", one)):
            engine = Engine(runner, tok, slots=4, max_loras=2, adapter_loader=lambda key: spec_state)
            q1, q2 = queue.Queue(), queue.Queue()
            from serving.engine import FinishEvent, Request
            engine.submit(Request(tok.encode("In the beginning", bos=True), SamplingParams(max_tokens=15), q1.put))
            engine.submit(Request(tok.encode("And God said", bos=True), SamplingParams(max_tokens=15), q2.put,
                                  adapter=("tpa", "v1")))
            res = []
            for q in (q1, q2):
                ev = q.get(timeout=60)
                while not isinstance(ev, FinishEvent):
                    ev = q.get(timeout=60)
                res.append(ev.token_ids)
            outs[name] = res
            engine.shutdown()
        assert outs["tp"] == outs["one"] and all(len(r) == 15 for r in outs["tp"])
    finally:
        tp.shutdown()


@pytest.mark.usefixtures("ray_cluster")
def test_serve_deploy_tp2(tp_storage):
    import openai
    port = _port()
    herd("serve", "deploy", "--model", "base", "--tp", "2", "--port", str(port), "--worker-cpus", "0.5",
         "--max-loras", "2", storage=tp_storage)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for model, adapter in (("base", None), ("base:tpa", "tpa")):
            got = client.completions.create(model=model, prompt="In the beginning", max_tokens=12,
                                            temperature=0).choices[0].text
            assert got == generate_text(tp_storage, "base", "In the beginning", adapter=adapter, max_tokens=12)["text"]
        assert herd_json("serve", "status")["args"]["tp"] == 2
    finally:
        herd("serve", "shutdown")
    r = herd("serve", "deploy", "--model", "base", "--tp", "3", "--port", str(port), storage=tp_storage, expect=2)
    assert "--tp 3 must divide" in r.output
