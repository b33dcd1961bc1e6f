"""Fine-tuning at scale, checked on CPU: accelerator from the worker, ZeRO-3 sharded loading,
packing, activation checkpointing, LoRA-only and streamed publishing, the loop without Ray."""

import json
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch

from cluster import finetune
from cluster.job_store import JobSpec, JobStore
from cluster.models import local_model_dir
from cluster.storage import open_storage
from jobs.packing import DocumentMask, collate_packed, pack_examples
from jobs.recipe import collate, enable_activation_checkpointing, token_loss_sum
from llama.config import preset
from llama.lora import expected_shapes, LoraSpec
from llama.model import Transformer, init_weights
from llama.sft_data import record_to_dialog, tokenize_dialog
from llama.tiny import demo_dataset
from llama.tokenizer import Tokenizer
from llama.weights import load_safetensors, state_dict_from_hf, tensor_files
from train_helpers import ParamProbe, make_job, run_recipe

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_accelerator_comes_from_the_job_not_the_shell(monkeypatch):
    from jobs.run import worker_env
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("DS_SKIP_CUDA_CHECK", "1")
    assert "DS_ACCELERATOR" not in finetune._env()
    env = worker_env()
    assert "DS_ACCELERATOR" not in env and env["DS_SKIP_CUDA_CHECK"] == "1"
    probe = ("import deepspeed.accelerator as a\nfrom jobs.accelerator import use_accelerator\n"
             "try:\n    use_accelerator({gpu})\nexcept RuntimeError as e:\n    print('refused:', e)\n"
             "print(a.get_accelerator().device_name(), a.get_accelerator().communication_backend_name())")
    # A --gpu job whose shell says cpu still gets CUDA + NCCL (and, on this GPU-less machine, a clear error).
    r = _python(probe.format(gpu=True), DS_ACCELERATOR="cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cuda nccl" in r.stdout and "sees no CUDA device" in r.stdout
    # A CPU job gets the CPU accelerator, whatever the shell says.
    r = _python(probe.format(gpu=False), DS_ACCELERATOR="cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2] == "cpu" and "refused" not in r.stdout


def test_gpu_demand_against_cluster_resources():
    spec = JobSpec(model="base", adapter="a", workers=4, use_gpu=True)
    with pytest.raises(finetune.NotEnoughResources, match="needs 4 GPUs .* the cluster has 2"):
        finetune.check_gpus(spec, {"CPU": {"used": 0, "total": 16}, "GPU": {"used": 0, "total": 2}})
    finetune.check_gpus(spec, {"GPU": {"used": 0, "total": 2}}, autoscale_gpus=2)  # the autoscaler can add 2
    finetune.check_gpus(spec.model_copy(update={"use_gpu": False}), {})
    waiting = finetune.waiting_for(spec, {"CPU": {"used": 2, "total": 8}, "GPU": {"used": 1, "total": 4}})
    assert waiting == "waiting for resources: 4 GPU (3 free of 4)"
    assert finetune.waiting_for(spec, {"CPU": {"used": 0, "total": 8}, "GPU": {"used": 0, "total": 4}}).startswith(
        "starting 4 workers")


def test_packed_batch_gives_the_same_loss_as_unpacked(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    examples = [tokenize_dialog(tok, record_to_dialog(d), 128) for d in demo_dataset(12)]
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg), seed=3)
    tokens, labels = collate(examples)
    with torch.no_grad():
        unpacked = token_loss_sum(model(tokens), labels).item()
    rows = pack_examples([len(e.input_ids) for e in examples], 128)
    assert len(rows) < len(examples) and sorted(i for r in rows for i in r) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in r) <= 128 for r in rows)
    tokens, labels, positions, docs = collate_packed([[examples[i] for i in r] for r in rows])
    assert int((labels != -100).sum()) == sum(e.n_loss_tokens for e in examples)
    with torch.no_grad():
        packed = token_loss_sum(model(tokens, positions, DocumentMask(docs)), labels).item()
        # Without the document mask the examples would see each other: the loss changes.
        leaky = token_loss_sum(model(tokens, positions), labels).item()
    assert packed == pytest.approx(unpacked, rel=1e-5)
    assert abs(leaky - unpacked) > 1e-3


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = preset("tiny")
    tokens = torch.randint(3, cfg.vocab_size, (2, 40))
    grads = []
    for checkpointed in (False, True):
        model = init_weights(Transformer(cfg), seed=1)
        if checkpointed:
            enable_activation_checkpointing(model)
        token_loss_sum(model(tokens), tokens).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def deep_model(url: str) -> None:
    """`deep`: the tiny model's width and vocabulary with 8 layers, so that, as in real Llamas, the
    decoder layers (not the embeddings) hold most of the weights."""
    from cluster.models import create_tiny_model, import_model
    from llama.weights import save_model
    storage = open_storage(url)
    create_tiny_model(storage, "base")
    cfg = preset("tiny").model_copy(update={"n_layers": 8})
    with tempfile.TemporaryDirectory() as d:
        save_model(init_weights(Transformer(cfg), seed=5), d)
        shutil.copy(local_model_dir(storage, "base") / "tokenizer.model", Path(d) / "tokenizer.model")
        import_model(storage, d, "deep")


def test_zero3_never_holds_the_whole_model_and_streams_its_publish(tmp_path):
    """ZeRO-3, 2 workers, full fine-tune: each rank reads and keeps only its partition (a hook on every
    module sees at most a fraction of the weights whole), and the published
    model, written shard by shard, equals DeepSpeed's zero_to_fp32 consolidation of the checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from jobs.checkpoints import DS_TAG
    url = str(tmp_path / "storage")
    deep_model(url)
    make_job(url, "z3", model="deep", method="full", zero=3, workers=2, max_steps=2, batch_size=2, lr=1e-3,
             checkpoint_every=2, eval_fraction=0.0, adapter="full-z3", publish_shard_mb=0.5)
    z3 = run_recipe(url, "z3", tmp_path, world=2, probe=ParamProbe)
    # Each rank loaded exactly its part of the base weights: gathered, they are the base model.
    # (That ZeRO-3 then trains like ZeRO-0 is test_finetune_recipe's loss-curve test.)
    base = state_dict_from_hf(load_safetensors(local_model_dir(open_storage(url), "deep")))
    loaded = torch.load(tmp_path / f"result-z3-{os.getpid()}-False.json.probe0.loaded.pt")
    assert set(loaded) == set(base) and all(torch.equal(loaded[n], base[n]) for n in base)
    for probe in z3["probes"]:
        assert probe["partition_bytes"] <= 0.55 * probe["model_bytes"]
        assert probe["peak_whole_bytes"] < 0.5 * probe["model_bytes"], probe
    metrics = JobStore(open_storage(url)).metrics("z3")
    assert all(len(m["peak_memory_mb_per_worker"]) == 2 and m["peak_memory_mb"] == max(m["peak_memory_mb_per_worker"])
               for m in metrics)

    published_dir = local_model_dir(open_storage(url), "full-z3")
    assert len(set(tensor_files(published_dir).values())) >= 3  # written as several shards
    published = state_dict_from_hf(load_safetensors(published_dir))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt-z3" / "step_000002"), tag=DS_TAG)
    assert set(published) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(published[name], tensor), name
    assert any(not torch.equal(base[n], published[n]) for n in base)  # it did train


def test_lora_zero3_packed_checkpointed_publishes_only_lora(tmp_path):
    """LoRA on ZeRO-3 with --pack and --activation-checkpointing: it learns, and publishing gathers
    the adapter's tensors only, never the frozen base."""
    url = str(tmp_path / "storage")
    deep_model(url)
    spec = make_job(url, "lz3", model="deep", zero=3, workers=2, max_steps=3, batch_size=2, lr=3e-2, pack=True,
                    activation_checkpointing=True, max_seq_len=128, eval_fraction=0.0)
    result = run_recipe(url, "lz3", tmp_path, world=2, probe=ParamProbe)
    assert result["published"]["kind"] == "adapter" and result["losses"][-1] < result["losses"][0]
    cfg = preset("tiny").model_copy(update={"n_layers": 8})
    lora_count = len(expected_shapes(cfg, LoraSpec(r=spec.lora_rank, lora_alpha=1, target_modules=spec.lora_targets)))
    for probe in result["probes"]:
        assert probe["gathered"] and all(".lora_" in name for name in probe["gathered"]), probe["gathered"]
        assert len(probe["gathered"]) == lora_count
        assert probe["peak_whole_bytes"] < 0.5 * probe["model_bytes"]


def test_the_recipe_runs_in_one_process_without_ray(tmp_path):
    """`python -m jobs.local` (what the device machine runs, where Ray is absent)."""
    url = str(tmp_path / "storage")
    make_job(url, "solo", zero=2, max_steps=2, pack=True)
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now fails
            f"from jobs.local import main; sys.exit(main(['--job-id', 'solo', '--storage', {url!r}]))")
    r = _python(code)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = JobStore(open_storage(url)).read("solo")
    assert record["state"] == "SUCCEEDED" and record["result"]["kind"] == "adapter"
    assert [m["step"] for m in JobStore(open_storage(url)).metrics("solo")] == [1, 2]
    assert json.loads((tmp_path / "storage" / "jobs" / "solo" / "job.json").read_text())["attempts"] == 1


def test_fp32_master_copy_is_shared_and_trains_the_same():
    """CPU (fp32) jobs: DeepSpeed's ZeRO optimizers update the model's own partition instead of a
    second fp32 copy of it (4 bytes per parameter saved), with the same losses as with the copy."""
    script = """
import json, os, socket, torch, torch.distributed as dist, torch.nn.functional as F
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from jobs.accelerator import use_accelerator
use_accelerator(False)
import deepspeed
from jobs.loading import share_fp32_master, zero_tuning
from llama.config import preset
from llama.model import Transformer
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = preset("tiny")
tokens = torch.randint(3, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
out = {}
for zero in (1, 2, 3):
    for share in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        conf = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": zero, **zero_tuning(cfg, zero)}}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
        freed = share_fp32_master(opt) if share else 0
        if zero == 3:
            master, own = opt.fp32_partitioned_groups_flat[0], opt.fp16_partitioned_groups_flat[0]
        else:
            master, own = opt.single_partition_of_fp32_groups[0], opt.parallel_partitioned_bit16_groups[0][0]
        losses = []
        for _ in range(3):
            logits = engine(tokens)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[f"{zero}-{share}"] = {"freed": freed, "numel": master.numel(), "losses": losses,
                                  "same_storage": master.data_ptr() == own.data_ptr()}
print("RESULT", json.dumps(out))
"""
    r = _python(script)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    for zero in (1, 2, 3):
        copy, shared = out[f"{zero}-False"], out[f"{zero}-True"]
        assert not copy["same_storage"] and shared["same_storage"], (zero, out)
        assert shared["freed"] == 4 * shared["numel"] > 0
        assert shared["losses"] == copy["losses"] and copy["losses"][-1] < copy["losses"][0], (zero, out)


def test_cpu_workers_return_freed_tensors_to_the_os():
    """After a big free raised glibc's mmap threshold, ~1 MB tensors freed behind a small live one
    stay in the heap; a CPU worker's allocator setting (jobs/accelerator.py) gives them back."""
    script = """
import os, torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if {tuned}:
    from jobs.accelerator import return_freed_host_memory
    assert return_freed_host_memory()
big = torch.ones(64 * 2**20 // 4)
del big
before = rss()
blocks, keep = [], []
for _ in range(300):
    blocks.append(torch.ones(900 * 1024 // 4))
    keep.append(torch.ones(16))
del blocks
print("RETAINED", rss() - before)
"""
    retained = {}
    for tuned in (False, True):
        r = _python(script.format(tuned=tuned))
        assert r.returncode == 0, r.stderr[-3000:]
        retained[tuned] = float(r.stdout.split("RETAINED", 1)[1])
    assert retained[False] > 150 and retained[True] < 30, retained
