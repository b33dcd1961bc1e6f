"""The job driver: `python -m jobs.run --job-id ID [--resume]`, started by Ray's Job Submission API.

It reads the job spec from the storage root, runs the recipe on N Ray Train workers (each rank
writes its checkpoint files under `jobs/<id>/checkpoints/run-<attempt>/`; Ray Train keeps its own
run state beside them, in `attempt-<n>/`), lets Ray Train restart a lost worker group from the
last checkpoint (`FailureConfig(max_failures)`), and records the outcome in job.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from cluster.job_store import JobStore
from cluster.ray_cluster import forward_aws_requested, forwarded_env
from cluster.storage import open_storage


class RayHooks:
    """Recipe hooks under Ray Train: metrics to ray.train.report, checkpoints to the storage root.

    Each rank writes its checkpoint files straight to `<job>/checkpoints/run-<attempt>/` in the
    storage root (jobs/checkpoints.py); Ray only sees metrics. A worker group that Ray Train
    restarts after a lost worker continues from this run's latest complete checkpoint there; a
    resumed job (`--resume`) starts a new run from the job's latest one (`resume_key`).
    """

    def __init__(self, storage_url: str, run_prefix: str, resume_key: str | None = None):
        self.storage = open_storage(storage_url)
        self.run_prefix = run_prefix
        self.resume_key = resume_key

    def report(self, metrics: dict) -> None:
        import ray.train
        ray.train.report(metrics)

    def checkpoint_place(self):
        return self.storage, self.run_prefix

    def restored_checkpoint(self):
        from jobs.checkpoints import complete_checkpoints
        mine = complete_checkpoints(self.storage, self.run_prefix)
        if mine:
            return self.storage, mine[-1][1]
        return (self.storage, self.resume_key) if self.resume_key is not None else None


def worker_main(config: dict) -> None:
    """What each Ray Train worker runs (the recipe picks the accelerator from the spec)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from jobs.recipe import train
    store = JobStore(open_storage(config["storage"]))
    hooks = RayHooks(config["storage"], config["run_prefix"], config.get("resume_key"))
    train(store.spec(config["job_id"]), config["job_id"], config["storage"], hooks)


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
        # temporary credentials (STS, SSO) are only valid with their session token
        session_token=os.environ.get("AWS_SESSION_TOKEN") if os.environ.get("AWS_ACCESS_KEY_ID") else None,
        region=os.environ.get("AWS_REGION", "us-east-1"), force_virtual_addressing=False)
    return f"{s3.bucket}/{s3.prefix + '/' if s3.prefix else ''}{key}", fs


def latest_checkpoint_key(storage_url: str, job_id: str) -> str | None:
    """Storage key of the newest complete checkpoint folder of a job, or None."""
    from jobs.recipe import checkpoint_steps
    steps = checkpoint_steps(JobStore(open_storage(storage_url)), job_id)
    return steps[-1][1] if steps else None


def worker_env() -> dict[str, str]:
    """Environment the driver hands to its workers: storage credentials, Herd and DeepSpeed
    settings, but never DS_ACCELERATOR (each worker chooses it from the job spec)."""
    # AWS credentials reach the workers only where the submitter forwarded them to this driver.
    env = forwarded_env(("AWS_", "HERD_", "DS_", "TORCH_EXTENSIONS_DIR"), forward_aws_requested())
    env.pop("DS_ACCELERATOR", None)
    return env


def run(job_id: str, storage_url: str, resume: bool) -> int:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.accelerator import process_group_backend

    store = JobStore(open_storage(storage_url))
    spec = store.spec(job_id)
    record = store.update(job_id, state="RUNNING", error=None, attempts=store.read(job_id)["attempts"] + 1)
    resume_key = latest_checkpoint_key(storage_url, job_id) if resume else None
    if resume:
        print(f"[herd] resuming job {job_id} from {resume_key or 'the start (no checkpoint yet)'}", flush=True)
    env = worker_env()
    try:
        storage_path, fs = ray_storage(storage_url, job_id)
        trainer = TorchTrainer(
            worker_main,
            train_loop_config={"job_id": job_id, "storage": storage_url, "resume_key": resume_key,
                               "run_prefix": f"{store.checkpoints_key(job_id)}/run-{record['attempts']}"},
            torch_config=TorchConfig(backend=process_group_backend(spec.use_gpu)),
            scaling_config=ray.train.ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                                   resources_per_worker={"CPU": spec.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=f"attempt-{record['attempts']}", storage_path=storage_path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
                worker_runtime_env={"env_vars": env}),
        )
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
    parser.add_argument("--spec", help="create the job from this spec file first (a RayJob; see infra/)")
    parser.add_argument("--data", help="with --spec: the JSONL training data")
    args = parser.parse_args(argv)
    storage_url = open_storage(args.storage).url
    if args.spec:
        from cluster.job_spec_file import ensure_job
        created = ensure_job(open_storage(storage_url), args.job_id, args.spec, args.data)
        if not created and JobStore(open_storage(storage_url)).read(args.job_id)["state"] == "SUCCEEDED":
            return 0  # a retried entrypoint of a finished job: nothing left to do
        args.resume = args.resume or not created  # an entrypoint retried by KubeRay continues the job
    return run(args.job_id, storage_url, args.resume)


if __name__ == "__main__":
    sys.exit(main())
