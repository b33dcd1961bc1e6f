"""Run the fine-tuning recipe without Ray: one process, or N processes over gloo."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from cluster.job_store import JobSpec, JobStore
from cluster.models import create_tiny_model, model_exists
from cluster.storage import open_storage
from llama.tiny import demo_dataset


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(storage_url: str, job_id: str, n_examples: int = 48, **spec) -> JobSpec:
    storage = open_storage(storage_url)
    if not model_exists(storage, "base"):
        create_tiny_model(storage, "base")
    data = "".join(json.dumps(r) + "\n" for r in demo_dataset(n_examples))
    defaults = dict(model="base", adapter="tuned", workers=1, lr=1e-2, batch_size=4, checkpoint_every=100,
                    data_sha256=hashlib.sha256(data.encode()).hexdigest())
    job_spec = JobSpec(**{**defaults, **spec})
    store = JobStore(storage)
    store.create(job_id, job_spec)
    storage.write_text(store.data_key(job_id), data)
    return job_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, storage_url: str, job_id: str, ckpt_root: str, restore: str | None,
            out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from jobs.recipe import LocalHooks, train
    store = JobStore(open_storage(storage_url))
    result = train(store.spec(job_id), job_id, storage_url, LocalHooks(ckpt_root, restore))
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "first_step": result.first_step,
                                         "published": result.published, "eval_loss": result.eval_loss}))
    dist.destroy_process_group()


def run_recipe(storage_url: str, job_id: str, workdir: Path, world: int = 1, restore: str | None = None) -> dict:
    """Run the recipe on `world` local processes; returns rank 0's result."""
    out = workdir / f"result-{job_id}-{os.getpid()}-{restore is not None}.json"
    ckpt = workdir / f"ckpt-{job_id}"
    mp.start_processes(_worker, args=(world, _free_port(), storage_url, job_id, str(ckpt), restore, str(out)),
                       nprocs=world, join=True, start_method="spawn")
    return json.loads(out.read_text())
