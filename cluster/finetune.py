"""Submitting and watching fine-tuning jobs (the logic behind `herd finetune ...`).

Submission validates everything it can locally (spec, names, the whole data file, the base
model, the adapter name) before anything reaches the cluster, stores the data next to the
job record, and hands the run to Ray's Job Submission API as `python -m jobs.run`.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from cluster.job_store import JobSpec, JobStore, new_job_id
from cluster.models import model_exists
from cluster.ray_cluster import (ensure_cluster, forward_aws_requested, forwarded_env, require_cluster,
                                 resolve_address)
from cluster.registry import AdapterRegistry
from cluster.runtime_env import declared_runtime_env
from cluster.storage import Storage
from llama.sft_data import file_sha256, read_dataset

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Not DS_ACCELERATOR: the accelerator comes from the worker (jobs/accelerator.py), not this shell.
_PASS_ENV = ("AWS_", "HERD_", "TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED")


class SubmitError(ValueError):
    """A job that must not start (bad model, name clash); exit code 2."""


class NotEnoughResources(RuntimeError):
    """The cluster cannot ever run the job as asked (e.g. more GPUs than it has); exit code 1."""


def job_demand(spec: JobSpec) -> dict[str, float]:
    """Resources the whole job needs at once: each worker's CPUs, and one GPU each with --gpu."""
    demand = {"CPU": spec.workers * spec.cpus_per_worker}
    if spec.use_gpu:
        demand["GPU"] = float(spec.workers)
    return demand


def check_gpus(spec: JobSpec, resources: dict[str, dict[str, float]], autoscale_gpus: float = 0.0) -> None:
    """Refuse a --gpu job that asks for more GPUs than the cluster has and can autoscale to.

    `resources` is `cluster_status()`'s {"GPU": {"used", "total"}, ...}; `autoscale_gpus` the GPUs
    the autoscaler may still add (HERD_AUTOSCALE_MAX_GPUS on clusters that scale out)."""
    if not spec.use_gpu:
        return
    have = resources.get("GPU", {}).get("total", 0.0)
    need = job_demand(spec)["GPU"]
    if need > have + autoscale_gpus:
        more = f" (+{autoscale_gpus:g} it can autoscale to)" if autoscale_gpus else ""
        raise NotEnoughResources(
            f"this --gpu job needs {need:g} GPUs ({spec.workers} workers x 1 GPU) but the cluster has "
            f"{have:g}{more}; use fewer --workers, a cluster with GPUs (--address), or drop --gpu")


def waiting_for(spec: JobSpec, resources: dict[str, dict[str, float]]) -> str:
    """What a job that has not started training waits for, in words (for `status` and `--follow`)."""
    short = []
    for name, need in job_demand(spec).items():
        r = resources.get(name, {"used": 0.0, "total": 0.0})
        free = r["total"] - r["used"]
        if free < need:
            short.append(f"{need:g} {name} ({free:g} free of {r['total']:g})")
    if short:
        return "waiting for resources: " + ", ".join(short)
    return f"starting {spec.workers} workers (loading the model)"


def _autoscale_gpus() -> float:
    import os
    return float(os.environ.get("HERD_AUTOSCALE_MAX_GPUS", "0") or 0)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(require_cluster(address))


def check_submission(storage: Storage, spec: JobSpec, data: Path) -> str:
    """Everything that can be checked before the cluster is involved; returns the data sha256."""
    read_dataset(data)  # FILE:LINE errors for the first bad line
    if not model_exists(storage, spec.model):
        raise SubmitError(f"unknown model {spec.model!r} in {storage.url}; see `herd models list` "
                          "or create one with `herd models create-tiny --name NAME`")
    if spec.method == "lora":
        owner = AdapterRegistry(storage)._base_of(spec.adapter)
        if owner is not None and owner != spec.model:
            raise SubmitError(f"adapter name {spec.adapter!r} already belongs to base model {owner!r}; "
                              f"choose another --adapter for {spec.model!r}")
    elif model_exists(storage, spec.adapter):
        raise SubmitError(f"a full fine-tune publishes a new base model, and model {spec.adapter!r} already "
                          "exists; choose another --adapter name")
    return file_sha256(data)


def _env(forward_aws: bool | None = None) -> dict[str, str]:
    """What the job's driver inherits; never DS_ACCELERATOR (each worker picks it from the job spec)."""
    forward = forward_aws_requested(forward_aws)
    env = forwarded_env(_PASS_ENV, forward)
    env.pop("DS_ACCELERATOR", None)
    if forward:  # the job's driver forwards them on to its training workers
        env["HERD_FORWARD_AWS_ENV"] = "1"
    return env


def _submit_ray_job(storage: Storage, job_id: str, address: str | None, resume: bool, say,
                    forward_aws: bool | None = None) -> str:
    url = ensure_cluster(address, say)
    python = sys.executable if resolve_address(address) is None else "python"
    store = JobStore(storage)
    attempt = store.read(job_id)["attempts"]
    submission_id = job_id if attempt == 0 and not resume else f"{job_id}-r{attempt + 1}-{int(time.time())}"
    entrypoint = shlex.join([python, "-m", "jobs.run", "--job-id", job_id, "--storage", storage.url]
                            + (["--resume"] if resume else []))
    from ray.job_submission import JobSubmissionClient
    JobSubmissionClient(url).submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                        runtime_env=declared_runtime_env({**_env(forward_aws), "HERD_STORAGE": storage.url}),
                                        metadata={"herd": "finetune", "job_id": job_id})
    store.update(job_id, ray_submission_id=submission_id, state="PENDING", address=url)
    return submission_id


def submit(storage: Storage, spec: JobSpec, data: Path, address: str | None, say=print,
           forward_aws: bool | None = None) -> str:
    spec = spec.model_copy(update={"data_sha256": check_submission(storage, spec, data)})
    if spec.use_gpu:
        from cluster.ray_cluster import cluster_status
        ensure_cluster(address, say)
        check_gpus(spec, cluster_status(address).get("resources", {}), _autoscale_gpus())
    job_id = new_job_id()
    store = JobStore(storage)
    store.storage.upload_file(data, store.data_key(job_id))
    store.create(job_id, spec)
    _submit_ray_job(storage, job_id, address, resume=False, say=say, forward_aws=forward_aws)
    return job_id


def resume(storage: Storage, job_id: str, address: str | None, say=print, forward_aws: bool | None = None) -> str:
    store = JobStore(storage)
    record = status(storage, job_id, address)
    if record["state"] not in TERMINAL:
        raise SubmitError(f"job {job_id} is {record['state']}; only a stopped or failed job can be resumed")
    if record["state"] == "SUCCEEDED":
        raise SubmitError(f"job {job_id} already succeeded; nothing to resume")
    store.spec(job_id)  # still a valid spec
    _submit_ray_job(storage, job_id, address, resume=True, say=say, forward_aws=forward_aws)
    return job_id


def _ray_state(record: dict, address: str | None) -> str | None:
    sub = record.get("ray_submission_id")
    if not sub:
        return None
    try:
        return str(_client(address or record.get("address")).get_job_status(sub).value)
    except Exception:  # noqa: BLE001 - cluster gone: job.json is all we know
        return None


def status(storage: Storage, job_id: str, address: str | None = None) -> dict:
    """job.json, with the state reconciled against Ray (a killed driver cannot record its end)."""
    store = JobStore(storage)
    record = store.read(job_id)
    ray_state = _ray_state(record, address)
    record["ray_state"] = ray_state
    if ray_state in TERMINAL and record["state"] not in TERMINAL:
        record = store.update(job_id, state=ray_state, error=record.get("error") or f"Ray job {ray_state.lower()}")
        record["ray_state"] = ray_state
    metrics = store.metrics(job_id)
    record["last_metrics"] = metrics[-1] if metrics else None
    record["waiting_for"] = None
    if not metrics and record["state"] not in TERMINAL and ray_state is not None:
        record["waiting_for"] = _waiting(record, address)
    return record


def _waiting(record: dict, address: str | None) -> str | None:
    from cluster.ray_cluster import cluster_status
    try:
        resources = cluster_status(address or record.get("address"), wait_s=0).get("resources", {})
    except Exception:  # noqa: BLE001 - the cluster went away; status says what Ray said
        return None
    return waiting_for(JobSpec(**record["spec"]), resources)


def list_jobs(storage: Storage) -> list[dict]:
    return [{"id": r["id"], "state": r["state"], "model": r["spec"]["model"], "adapter": r["spec"]["adapter"],
             "method": r["spec"]["method"], "created": r["created"], "result": r.get("result")}
            for r in JobStore(storage).list()]


def logs(storage: Storage, job_id: str, address: str | None = None) -> str:
    record = JobStore(storage).read(job_id)
    sub = record.get("ray_submission_id")
    if not sub:
        return ""
    return _client(address or record.get("address")).get_job_logs(sub)


def stop(storage: Storage, job_id: str, address: str | None = None) -> dict:
    store = JobStore(storage)
    record = store.read(job_id)
    if record["state"] in TERMINAL:
        return record
    sub = record.get("ray_submission_id")
    if sub:
        client = _client(address or record.get("address"))
        client.stop_job(sub)
        deadline = time.time() + 30
        while time.time() < deadline and str(client.get_job_status(sub).value) not in TERMINAL:
            time.sleep(0.5)
    return store.update(job_id, state="STOPPED", error="stopped by the user")


def follow(storage: Storage, job_id: str, address: str | None = None, poll_s: float = 1.0,
           timeout_s: float | None = None) -> dict:
    """Show a progress bar (step, loss, lr, tokens/s, memory) until the job ends; return its record."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    store = JobStore(storage)
    start = time.time()
    columns = (TextColumn("[bold]{task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("train", total=None, job=job_id, info="waiting for workers")
        while True:
            record = status(storage, job_id, address)
            metrics = store.metrics(job_id)
            if not metrics and record.get("waiting_for"):
                progress.update(task, info=record["waiting_for"])
            if metrics:
                m = metrics[-1]
                progress.update(task, total=m["total_steps"], completed=m["step"],
                                info=f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  "
                                     f"{m['peak_memory_mb']:.0f} MB")
            if record["state"] in TERMINAL:
                return record
            if timeout_s is not None and time.time() - start > timeout_s:
                return record
            time.sleep(poll_s)


def describe(record: dict) -> str:
    spec = record["spec"]
    lines = [f"job {record['id']}: {record['state']}",
             f"  {spec['method']} of {spec['model']} -> {spec['adapter']}, ZeRO-{spec['zero']}"
             f"{' + offload' if spec['offload'] else ''}, {spec['workers']} workers",
             f"  created {record['created']}, attempts {record['attempts']}"]
    if record.get("waiting_for"):
        lines.append(f"  {record['waiting_for']}")
    if record.get("last_metrics"):
        m = record["last_metrics"]
        lines.append(f"  step {m['step']}/{m['total_steps']}  loss {m['loss']:.4f}  lr {m['lr']:.2e}")
        if m.get("peak_memory_mb_per_worker"):
            lines.append("  peak memory per worker: "
                         + ", ".join(f"{mb:.0f} MB" for mb in m["peak_memory_mb_per_worker"]))
    if record.get("result"):
        lines.append(f"  published: {json.dumps(record['result'])}")
    if record.get("error"):
        lines.append(f"  error: {record['error']}")
    return "\n".join(lines)
