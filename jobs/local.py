"""`python -m jobs.local --job-id ID [--storage URL]`: run a stored job in this one process, no Ray.

The same recipe as on a cluster (jobs/recipe.py), with `LocalHooks` keeping checkpoints in a local
folder, a one-process group (gloo, or NCCL for a --gpu job) and the outcome recorded in job.json.
It is how a machine without Ray (a lone GPU box) runs and checks a job.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import traceback

from cluster.job_store import JobStore
from cluster.storage import open_storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(job_id: str, storage_url: str, checkpoint_root: str | None = None):
    """Run job `job_id` here; returns the recipe's TrainResult (raises on failure, recorded)."""
    import torch.distributed as dist

    from jobs.accelerator import process_group_backend, use_accelerator
    from jobs.recipe import LocalHooks, train

    store = JobStore(open_storage(storage_url))
    spec = store.spec(job_id)
    record = store.update(job_id, state="RUNNING", error=None, attempts=store.read(job_id)["attempts"] + 1)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    use_accelerator(spec.use_gpu)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(process_group_backend(spec.use_gpu), rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(spec, job_id, storage_url, LocalHooks(checkpoint_root or tmp))
    except Exception as e:
        store.update(job_id, state="FAILED", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        if created:
            dist.destroy_process_group()
    store.update(job_id, state="SUCCEEDED")
    print(f"[herd] job {job_id} (attempt {record['attempts']}) succeeded: {result.published}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.local")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--storage", default=os.environ.get("HERD_STORAGE"))
    parser.add_argument("--checkpoints", default=None, help="keep checkpoints in this folder (or an s3:// prefix)")
    args = parser.parse_args(argv)
    try:
        run_local(args.job_id, open_storage(args.storage).url, args.checkpoints)
    except Exception:  # noqa: BLE001 - recorded in job.json; the traceback is for the operator
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
