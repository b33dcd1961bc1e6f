"""Run the fine-tuning recipe without Ray: one process, or N processes over gloo."""

from __future__ import annotations

import hashlib
import json
import os
import sys
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
            out: str, probe=None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from jobs.recipe import LocalHooks, train
    store = JobStore(open_storage(storage_url))
    on_model = probe(rank, f"{out}.probe{rank}") if probe is not None else None
    result = train(store.spec(job_id), job_id, storage_url, LocalHooks(ckpt_root, restore, on_model=on_model))
    if on_model is not None:
        on_model.save()
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": result.losses, "first_step": result.first_step,
                                         "published": result.published, "eval_loss": result.eval_loss}))
    dist.destroy_process_group()
    # Leave without interpreter teardown: a gloo/DeepSpeed thread still joinable there sometimes
    # aborted a finished worker ("terminate called without an active exception"), which is not
    # what these tests check (the results are written above). Recorded in the closing note.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_recipe(storage_url: str, job_id: str, workdir: Path, world: int = 1, restore: str | None = None,
               probe=None, checkpoints: str | None = None) -> dict:
    """Run the recipe on `world` local processes; returns rank 0's result. Checkpoints go to
    `checkpoints` (default: the folder workdir/ckpt-<job>); `restore` names a checkpoint folder.

    `probe(rank, path)` (a top-level class, e.g. `ParamProbe`) is called in each worker and gets
    the model once DeepSpeed holds it; its `save()` writes what it saw to `path`, returned under
    "probes" (one entry per rank)."""
    out = workdir / f"result-{job_id}-{os.getpid()}-{restore is not None}.json"
    ckpt = checkpoints or workdir / f"ckpt-{job_id}"  # a folder, or an s3:// prefix
    mp.start_processes(_worker, args=(world, _free_port(), storage_url, job_id, str(ckpt), restore, str(out), probe),
                       nprocs=world, join=True, start_method="spawn")
    result = json.loads(out.read_text())
    if probe is not None:
        result["probes"] = [json.loads(Path(f"{out}.probe{r}").read_text()) for r in range(world)]
    return result


class ParamProbe:
    """Watches the parameters a rank holds whole: at every module's forward and backward, the bytes
    of parameter data present (a ZeRO-3 partitioned parameter holds none until gathered), and
    every parameter that DeepSpeed's GatheredParameters gathers (which publishing uses)."""

    def __init__(self, rank: int, path: str):
        self.rank, self.path = rank, path
        self.peak_whole_bytes = 0
        self.model_bytes = 0
        self.partition_bytes = 0
        self.gathered: list[str] = []
        self.peak_at = ""

    def __call__(self, module) -> None:
        import deepspeed

        import jobs.publish
        params = list(module.parameters())
        names = {id(p): n for n, p in module.named_parameters()}
        self.model_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
        self.partition_bytes = sum(p.ds_tensor.numel() * p.element_size() for p in params if hasattr(p, "ds_tensor"))

        def look(*args):
            held = sum(p.data.numel() * p.element_size() for p in params)
            if held > self.peak_whole_bytes:
                self.peak_whole_bytes = held
                self.peak_at = f"{type(args[0]).__name__} {args[1]}" if args else "ready/publish"

        look()
        # The weights as loaded, gathered one tensor at a time (collective: every rank is here).
        loaded = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                loaded[name] = p.detach().clone()
        if self.rank == 0:
            import torch
            torch.save(loaded, f"{self.path}.loaded.pt")
        for m in module.modules():
            m.register_forward_pre_hook(lambda mod, *a: look(mod, "fwd"))
            m.register_forward_hook(lambda mod, *a: look(mod, "fwd-done"))
            m.register_full_backward_pre_hook(lambda mod, *a: look(mod, "bwd"))
        original = deepspeed.zero.GatheredParameters
        probe = self

        class Recording(original):
            def __init__(self, params, *args, **kwargs):
                params = list(params)
                probe.gathered += [names.get(id(p), "?") for p in params]
                super().__init__(params, *args, **kwargs)

            def __enter__(self):
                super().__enter__()
                look()

        jobs.publish.GatheredParameters = Recording

    def save(self) -> None:
        Path(self.path).write_text(json.dumps({"peak_whole_bytes": self.peak_whole_bytes, "peak_at": self.peak_at,
                                               "model_bytes": self.model_bytes,
                                               "partition_bytes": self.partition_bytes,
                                               "gathered": self.gathered}))


class CheckpointProbe:
    """Watches how a rank writes checkpoints: every key its storage checkpoint engine wrote, every
    torch.save aimed at a file path (staging on disk), and any non-empty file that appears in
    this worker's temp folder (a fresh one, set here) while a checkpoint is written."""

    def __init__(self, rank: int, path: str):
        self.rank, self.path = rank, path
        self.saved_keys: list[str] = []
        self.path_saves: list[str] = []
        self.temp_files: list[str] = []

    def __call__(self, module) -> None:
        import tempfile

        import torch

        import jobs.checkpoints
        tempfile.tempdir = tempfile.mkdtemp(prefix=f"worker{self.rank}-")
        plain_save, engine_save = torch.save, jobs.checkpoints.StorageCheckpointEngine.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                self.path_saves.append(str(f))
            return plain_save(obj, f, *args, **kwargs)

        def engine_save_and_look(engine, state_dict, path):
            engine_save(engine, state_dict, path)
            self.saved_keys.append(engine.key(path))
            self.temp_files += [str(p) for p in Path(tempfile.tempdir).rglob("*") if p.is_file() and p.stat().st_size]

        torch.save = save
        jobs.checkpoints.StorageCheckpointEngine.save = engine_save_and_look

    def save(self) -> None:
        Path(self.path).write_text(json.dumps({"saved_keys": self.saved_keys, "path_saves": self.path_saves,
                                               "temp_files": self.temp_files}))
