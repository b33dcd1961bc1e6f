"""`herd cluster ...` and `herd finetune ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cluster.cli import JsonOpt, StorageOpt, UsageProblem, emit, err_console, fail, out_console, run_guarded

AddressOpt = Annotated[str | None, typer.Option("--address", envvar="RAY_ADDRESS",
                                                help="Ray cluster (default: the local one Herd starts)")]
ForwardAwsOpt = Annotated[bool, typer.Option(
    "--forward-aws-env", envvar="HERD_FORWARD_AWS_ENV",
    help="copy AWS_* credentials into the cluster's runtime_env (default: the nodes' own AWS chain)")]

cluster_app = typer.Typer(help="The Ray cluster (a local head unless --address/RAY_ADDRESS).",
                          no_args_is_help=True)
finetune_app = typer.Typer(help="Fine-tuning jobs on Ray Train + DeepSpeed.", no_args_is_help=True)


def _say(msg: str) -> None:
    err_console.print(f"[yellow]{msg}[/]", highlight=False)


@cluster_app.command("up")
def cluster_up(json_: JsonOpt = False) -> None:
    """Start the local Ray head (it keeps running after this command)."""
    from cluster.ray_cluster import start_local

    def body():
        url, started = start_local()
        emit({"address": url, "started": started}, json_,
             f"{'started' if started else 'already running'}: local Ray cluster, dashboard {url}")
    run_guarded(body)


@cluster_app.command("down")
def cluster_down(json_: JsonOpt = False) -> None:
    """Stop the local Ray head and everything running on it (jobs, endpoints)."""
    from cluster.ray_cluster import stop_local

    def body():
        was_running = stop_local()
        emit({"stopped": was_running}, json_, "stopped the local Ray cluster" if was_running
             else "no local Ray cluster was running")
    run_guarded(body)


@cluster_app.command("status")
def cluster_status_cmd(address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Is the cluster up, and what resources does it have?"""
    from cluster.ray_cluster import cluster_status

    def body():
        st = cluster_status(address)
        if not st["running"]:
            emit(st, json_, f"no Ray cluster answers at {st['address']} (start one with `herd cluster up`)")
            raise typer.Exit(1)
        res = ", ".join(f"{k} {v['used']:g}/{v['total']:g}" for k, v in st["resources"].items())
        emit(st, json_, f"Ray cluster at {st['address']}: {res}")
    run_guarded(body)


@finetune_app.command("submit")
def finetune_submit(
    model: Annotated[str | None, typer.Option("--model", help="base model name")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="JSONL: prompt/completion or messages")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="adapter name (or new model name for full)")] = None,
    method: Annotated[str, typer.Option("--method", help="lora or full")] = "lora",
    zero: Annotated[int, typer.Option("--zero", help="DeepSpeed ZeRO stage 0-3")] = 2,
    offload: Annotated[bool, typer.Option("--offload", help="optimizer state on CPU (DeepSpeedCPUAdam)")] = False,
    workers: Annotated[int, typer.Option("--workers")] = 2,
    epochs: Annotated[float, typer.Option("--epochs")] = 1.0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="stop after this many steps")] = None,
    lr: Annotated[float, typer.Option("--lr")] = 2e-4,
    lora_rank: Annotated[int, typer.Option("--lora-rank")] = 8,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha")] = 16.0,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="comma-separated")] = "q_proj,k_proj,v_proj,o_proj",
    max_seq_len: Annotated[int, typer.Option("--max-seq-len")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="micro batch per worker")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum")] = 1,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 50,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    gpu: Annotated[bool, typer.Option("--gpu", help="one GPU per worker, bf16")] = False,
    pack: Annotated[bool, typer.Option("--pack", help="several examples per sequence (no attention across them)")] = False,
    activation_checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="recompute layer activations in backward (less memory, ~30% slower)")] = False,
    promote: Annotated[bool, typer.Option("--promote", help="make the result the current version")] = False,
    resume: Annotated[str | None, typer.Option("--resume", metavar="JOB", help="continue a stopped/failed job")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="show progress until the job ends")] = False,
    forward_aws_env: ForwardAwsOpt = False,
    address: AddressOpt = None, storage: StorageOpt = None, json_: JsonOpt = False,
) -> None:
    """Submit a fine-tuning job; prints the job id at once (--follow to watch it)."""
    from cluster import finetune
    from cluster.job_store import JobSpec
    from cluster.storage import open_storage

    def body():
        st = open_storage(storage)
        if resume:
            job_id = finetune.resume(st, resume, address, say=_say, forward_aws=forward_aws_env)
        else:
            missing = [flag for flag, v in (("--model", model), ("--data", data), ("--adapter", adapter)) if not v]
            if missing:
                raise UsageProblem(f"missing {', '.join(missing)} (or use --resume JOB)")
            try:
                spec = JobSpec(model=model, adapter=adapter, method=method, zero=zero, offload=offload,
                               workers=workers, epochs=epochs, max_steps=max_steps, lr=lr, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_targets=[t.strip() for t in lora_targets.split(",")],
                               max_seq_len=max_seq_len, batch_size=batch_size, grad_accum=grad_accum,
                               checkpoint_every=checkpoint_every, seed=seed, use_gpu=gpu, promote=promote,
                               pack=pack, activation_checkpointing=activation_checkpointing)
            except ValueError as e:
                raise UsageProblem(_pydantic_message(e)) from None
            try:
                job_id = finetune.submit(st, spec, data, address, say=_say, forward_aws=forward_aws_env)
            except finetune.NotEnoughResources as e:
                fail(str(e), 1)
        if not follow:
            emit({"job_id": job_id}, json_, job_id)
            return
        err_console.print(f"job {job_id} submitted", highlight=False)
        record = finetune.follow(st, job_id, address)
        emit(record, json_, finetune.describe(record))
        if record["state"] != "SUCCEEDED":
            raise typer.Exit(1)
        from cluster.handoff import handoff_lines  # the train -> serve hand-off, on stderr
        for line in handoff_lines(record, address):
            err_console.print(f"[bold green]{line}[/]", highlight=False)
    run_guarded(body)


def _pydantic_message(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"--{loc.replace('_', '-')}: {err['msg']}" if loc else err["msg"])
        return "; ".join(parts)
    return str(e)


@finetune_app.command("list")
def finetune_list(storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """List fine-tuning jobs recorded in the storage root."""
    from cluster import finetune
    from cluster.storage import open_storage

    def body():
        rows = finetune.list_jobs(open_storage(storage))
        if json_:
            emit(rows, True)
            return
        table = Table("job", "state", "method", "model", "adapter", "created", "result")
        for r in rows:
            res = r["result"] or {}
            table.add_row(r["id"], r["state"], r["method"], r["model"], r["adapter"], r["created"],
                          f"{res.get('name', '')}{'@' + res['version'] if res.get('version') else ''}")
        out_console.print(table)
    run_guarded(body)


@finetune_app.command("status")
def finetune_status(job: str, address: AddressOpt = None, storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """State, last metrics and result of one job."""
    from cluster import finetune
    from cluster.storage import open_storage

    def body():
        record = finetune.status(open_storage(storage), job, address)
        emit(record, json_, finetune.describe(record))
    run_guarded(body)


@finetune_app.command("logs")
def finetune_logs(job: str, follow: Annotated[bool, typer.Option("--follow", help="progress bar until it ends")] = False,
                  address: AddressOpt = None, storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """The job's log (driver and workers); --follow shows live progress."""
    from cluster import finetune
    from cluster.storage import open_storage

    def body():
        st = open_storage(storage)
        if follow:
            record = finetune.follow(st, job, address)
            emit(record, json_, finetune.describe(record))
            return
        text = finetune.logs(st, job, address)
        emit({"job_id": job, "log": text}, json_, text)
    run_guarded(body)


@finetune_app.command("stop")
def finetune_stop(job: str, address: AddressOpt = None, storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Stop a running job; its checkpoints stay for `submit --resume`."""
    from cluster import finetune
    from cluster.storage import open_storage

    def body():
        record = finetune.stop(open_storage(storage), job, address)
        emit({"job_id": job, "state": record["state"]}, json_, f"job {job}: {record['state']}")
    run_guarded(body)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(finetune_app, name="finetune")
