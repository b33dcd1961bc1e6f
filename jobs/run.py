"""The job driver: `python -m jobs.run --job-id ID [--resume]`, started by Ray's Job Submission API.

It reads the job spec from the storage root, runs the recipe on N Ray Train workers with
checkpoints stored under `jobs/<id>/checkpoints/`, lets Ray Train restart a lost worker group
from the last checkpoint (`FailureConfig(max_failures)`), and records the outcome in job.json.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator

from cluster.job_store import JobStore
from cluster.storage import open_storage


class RayHooks:
    """Recipe hooks backed by ray.train: report metrics/checkpoints, restore the latest."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[str | None]:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d


def worker_main(config: dict) -> None:
    """What each Ray Train worker runs."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from jobs.recipe import train
    store = JobStore(open_storage(config["storage"]))
    train(store.spec(config["job_id"]), config["job_id"], config["storage"], RayHooks())


def ray_storage(storage_url: str, job_id: str):
    """(storage_path, pyarrow filesystem or None) for Ray Train's checkpoints of this job."""
    from cluster.storage import LocalStorage
    store = JobStore(open_storage(storage_url))
    key = store.checkpoints_key(job_id)
    if isinstance(store.storage, LocalStorage):
        return str(store.storage.root / key), None
    import pyarrow.fs
    s3 = store.storage
    endpoint = s3.endpoint or ""
    scheme = "https" if endpoint.startswith("https://") else "http"
    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[-1] or None, scheme=scheme if endpoint else "https",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"), secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_REGION", "us-east-1"), force_virtual_addressing=False)
    return f"{s3.bucket}/{s3.prefix + '/' if s3.prefix else ''}{key}", fs


def latest_checkpoint(storage_url: str, job_id: str):
    """The newest complete checkpoint of a job as a ray.train.Checkpoint, or None."""
    import ray.train
    from jobs.recipe import checkpoint_steps
    store = JobStore(open_storage(storage_url))
    steps = checkpoint_steps(store, job_id)
    if not steps:
        return None
    base, fs = ray_storage(storage_url, job_id)
    folder = steps[-1][1][len(store.checkpoints_key(job_id)) + 1:]
    return ray.train.Checkpoint(path=f"{base}/{folder}", filesystem=fs)


def run(job_id: str, storage_url: str, resume: bool) -> int:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    store = JobStore(open_storage(storage_url))
    spec = store.spec(job_id)
    record = store.update(job_id, state="RUNNING", error=None, attempts=store.read(job_id)["attempts"] + 1)
    restore = latest_checkpoint(storage_url, job_id) if resume else None
    if resume:
        print(f"[herd] resuming job {job_id} from {restore.path if restore else 'the start (no checkpoint yet)'}",
              flush=True)
    storage_path, fs = ray_storage(storage_url, job_id)
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("AWS_", "HERD_", "DS_", "TORCH_EXTENSIONS_DIR"))}
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={"job_id": job_id, "storage": storage_url},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                               resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"attempt-{record['attempts']}", storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env}),
        resume_from_checkpoint=restore,
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - any failure is recorded; checkpoints stay for --resume
        traceback.print_exc()
        store.update(job_id, state="FAILED", error=f"{type(e).__name__}: {e}"[:2000])
        print(f"[herd] job {job_id} failed; its checkpoints are kept: `herd finetune submit --resume {job_id}`",
              flush=True)
        return 1
    store.update(job_id, state="SUCCEEDED")
    print(f"[herd] job {job_id} succeeded: {store.read(job_id)['result']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--storage", default=os.environ.get("HERD_STORAGE"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage_url = open_storage(args.storage).url
    return run(args.job_id, storage_url, args.resume)


if __name__ == "__main__":
    sys.exit(main())
