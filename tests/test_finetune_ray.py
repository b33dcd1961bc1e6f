"""Real fine-tuning jobs: Ray Job Submission -> Ray Train (2 workers) -> DeepSpeed -> the registry."""

import json
import time

import pytest
import torch

from clirun import herd, herd_json
from cluster import finetune
from cluster.job_store import JobSpec, JobStore
from cluster.models import create_tiny_model, local_model_dir
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage
from llama.tiny import demo_dataset
from llama.weights import load_model
from train_helpers import write_jsonl

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", demo_dataset(48))


def _storage_with_base(url):
    storage = open_storage(url)
    create_tiny_model(storage, "base")
    return storage


def test_cluster_status(ray_cluster):
    status = herd_json("cluster", "status")
    assert status["running"] and status["resources"]["CPU"]["total"] >= 4


def test_gpu_job_refused_on_a_cluster_without_gpus(storage_dir, data):
    """Ray Train would wait forever for GPUs this cluster does not have: refused at submission, exit 1."""
    _storage_with_base(str(storage_dir))
    r = herd("finetune", "submit", "--model", "base", "--data", str(data), "--adapter", "gpu-job", "--gpu",
             "--workers", "2", "--follow", storage=storage_dir, expect=1)
    assert "needs 2 GPUs (2 workers x 1 GPU) but the cluster has 0" in r.output
    assert herd_json("finetune", "list", storage=storage_dir) == []  # nothing submitted, nothing stored


def test_lora_zero2_two_workers_via_cli(tmp_path, storage_dir, data):
    _storage_with_base(str(storage_dir))
    r = herd("finetune", "submit", "--model", "base", "--data", str(data), "--adapter", "bible", "--zero", "2",
             "--workers", "2", "--epochs", "2", "--lr", "3e-2", "--lora-rank", "8", "--checkpoint-every", "5",
             "--follow", "--json", storage=storage_dir)
    record = json.loads(r.stdout[r.stdout.index("{"):])
    assert record["state"] == "SUCCEEDED", record
    job_id = record["id"]
    metrics = JobStore(open_storage(str(storage_dir))).metrics(job_id)
    assert [m["step"] for m in metrics] == list(range(1, metrics[-1]["total_steps"] + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1
    assert all(m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0 and m["lr"] > 0 for m in metrics)
    assert record["result"]["version"] == "v1"
    meta = herd_json("adapters", "show", "bible", storage=storage_dir)
    assert meta["job_id"] == job_id and meta["metrics"]["eval_loss"] is not None and len(meta["data_sha256"]) == 64
    base = herd_json("generate", "--model", "base", "--max-tokens", "12", "In the beginning", storage=storage_dir)
    tuned = herd_json("generate", "--model", "base", "--adapter", "bible", "--max-tokens", "12", "In the beginning",
                      storage=storage_dir)
    assert base["token_ids"] != tuned["token_ids"]
    listed = herd_json("finetune", "list", storage=storage_dir)
    assert [j["id"] for j in listed] == [job_id] and listed[0]["state"] == "SUCCEEDED"
    logs = herd_json("finetune", "logs", job_id, storage=storage_dir)["log"]
    assert "[herd] step 1/" in logs and "published" in logs
    ckpts = [k for k in open_storage(str(storage_dir)).list_keys(f"jobs/{job_id}/checkpoints") if "herd_state" in k]
    assert ckpts  # checkpoints went through ray.train.report into the storage root


def test_full_finetune_zero3_publishes_consolidated_weights(tmp_path, storage_dir, data):
    storage = _storage_with_base(str(storage_dir))
    spec = JobSpec(model="base", adapter="base-full", method="full", zero=3, workers=2, max_steps=4, lr=1e-3,
                   checkpoint_every=100)
    job_id = finetune.submit(storage, spec, data, None)
    record = finetune.follow(storage, job_id, timeout_s=600)
    assert record["state"] == "SUCCEEDED", record
    assert record["result"] == {**record["result"], "kind": "model", "name": "base-full"}
    # Consolidate the final ZeRO-3 checkpoint independently and compare logits.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from jobs.checkpoints import DS_TAG
    from jobs.recipe import checkpoint_steps
    step, folder = checkpoint_steps(JobStore(storage), job_id)[-1]
    assert step == 4
    state = get_fp32_state_dict_from_zero_checkpoint(str(storage_dir / folder), tag=DS_TAG)
    reference = load_model(local_model_dir(storage, "base"))
    reference.load_state_dict(state)
    published = load_model(local_model_dir(storage, "base-full"))
    original = load_model(local_model_dir(storage, "base"))
    tokens = torch.randint(0, 1000, (2, 30))
    with torch.no_grad():
        assert (published(tokens) - reference(tokens)).abs().max().item() <= 1e-5
        assert (published(tokens) - original(tokens)).abs().max().item() > 1e-3  # it did train


def test_killed_worker_resumes_from_checkpoint_on_s3(seaweed, monkeypatch, tmp_path, data):
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    url = "s3://herd/ft-kill"
    storage = _storage_with_base(url)
    spec = JobSpec(model="base", adapter="sturdy", zero=2, workers=2, epochs=3, max_steps=7, lr=1e-2, checkpoint_every=2,
                   fail_at_step=5, max_failures=1)
    job_id = finetune.submit(storage, spec, data, None)
    record = finetune.follow(storage, job_id, timeout_s=600)
    assert record["state"] == "SUCCEEDED", record
    metrics = JobStore(storage).metrics(job_id)
    steps = [m["step"] for m in metrics]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7], finetune.logs(storage, job_id)[-6000:]  # step 5 ran, the worker died, resumed from the step-4 checkpoint
    first, replay = [m for m in metrics if m["step"] == 5]
    assert abs(first["loss"] - replay["loss"]) <= 1e-5  # the curve continues where it was
    assert "injected failure at step 5" in finetune.logs(storage, job_id)
    assert AdapterRegistry(storage).versions("sturdy") == ["v1"]
    assert any(k.endswith("herd_state.json") for k in storage.list_keys(f"jobs/{job_id}/checkpoints"))


def test_failed_job_keeps_checkpoints_and_resume_finishes_it(storage_dir, data):
    storage = _storage_with_base(str(storage_dir))
    spec = JobSpec(model="base", adapter="phoenix", zero=1, workers=2, epochs=3, max_steps=6, lr=1e-2, checkpoint_every=2,
                   fail_at_step=3, max_failures=0)
    job_id = finetune.submit(storage, spec, data, None)
    record = finetune.follow(storage, job_id, timeout_s=600)
    assert record["state"] == "FAILED" and record["error"]
    assert AdapterRegistry(storage).versions("phoenix") == []
    steps_before = [m["step"] for m in JobStore(storage).metrics(job_id)]
    assert steps_before == [1, 2, 3]
    r = herd("finetune", "submit", "--resume", job_id, "--follow", storage=storage_dir)
    assert "SUCCEEDED" in r.output
    steps = [m["step"] for m in JobStore(storage).metrics(job_id)]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # resumed from the step-2 checkpoint
    assert AdapterRegistry(storage).versions("phoenix") == ["v1"]
    herd("finetune", "submit", "--resume", job_id, storage=storage_dir, expect=2)  # already succeeded


def test_stop_a_running_job(storage_dir, data):
    storage = _storage_with_base(str(storage_dir))
    spec = JobSpec(model="base", adapter="halted", zero=0, workers=1, epochs=400, lr=1e-3, checkpoint_every=10)
    job_id = finetune.submit(storage, spec, data, None)
    deadline = time.time() + 300
    while time.time() < deadline and not JobStore(storage).metrics(job_id):
        time.sleep(1)
    assert JobStore(storage).metrics(job_id), "the job never started training"
    out = herd_json("finetune", "stop", job_id, storage=storage_dir)
    assert out["state"] == "STOPPED"
    status = herd_json("finetune", "status", job_id, storage=storage_dir)
    assert status["state"] == "STOPPED" and status["ray_state"] == "STOPPED"
    assert AdapterRegistry(storage).versions("halted") == []
