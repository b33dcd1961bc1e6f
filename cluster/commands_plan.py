"""`herd plan`: what hardware a model needs to serve and to fine-tune (cluster/plan.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster.cli import JsonOpt, StorageOpt, emit, out_console, run_guarded


def plan_cmd(
    model: Annotated[str, typer.Option("--model", help="7b, 13b, 70b, a preset or a stored model")] = "7b",
    gpu_memory_gib: Annotated[float, typer.Option("--gpu-memory-gib", min=1, help="memory of one GPU")] = 80.0,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=1)] = 8,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", min=1, help="sequences per replica")] = 32,
    context: Annotated[int | None, typer.Option("--context", min=1,
                                                help="tokens per sequence (serving default: the model's; "
                                                     "fine-tuning default 512)")] = None,
    method: Annotated[str, typer.Option("--method", help="lora or full")] = "lora",
    zero: Annotated[int, typer.Option("--zero", min=0, max=3)] = 2,
    offload: Annotated[bool, typer.Option("--offload", help="optimizer state in host memory")] = False,
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, help="fine-tuning table at this many GPUs "
                                                                   "(default: one node)")] = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1)] = 1,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1)] = 8,
    utilization: Annotated[float, typer.Option("--gpu-memory-utilization", min=0.1, max=1.0,
                                               help="fraction of a GPU a plan may fill")] = 0.9,
    storage: StorageOpt = None, json_: JsonOpt = False,
) -> None:
    """Serving and fine-tuning memory for a model, the GPUs it needs and the commands to run."""
    from cluster.plan import PlanInput, plan
    from cluster.storage import open_storage

    def body():
        inp = PlanInput(model=model, gpu_memory_gib=gpu_memory_gib, gpus_per_node=gpus_per_node,
                        max_concurrent=max_concurrent, context=context, method=method, zero=zero, offload=offload,
                        gpus=gpus, micro_batch=micro_batch, lora_rank=lora_rank, utilization=utilization)
        result = plan(inp, storage=open_storage(storage))
        if json_:
            emit(result, True)
        else:
            _print(result)
    run_guarded(body)


def _print(r: dict) -> None:
    from rich.table import Table
    s, f = r["serving"], r["finetune"]
    out_console.print(f"[bold]{r['model']}[/]: {f['parameters'] / 1e9:.2f}B parameters; GPUs of "
                      f"{r['gpu_memory_gib']:g} GiB, {r['gpus_per_node']} per node", highlight=False)
    out_console.print(f"Serving: bf16 weights {s['weights_gb']:.1f} GB, KV {s['kv_mib_per_token']:.3f} MiB/token; "
                      f"{s['max_concurrent']} sequences x {s['context']} tokens = {s['kv_total_gb']:.1f} GB of KV; "
                      f"usable per GPU {s['usable_gb_per_gpu']:.1f} GB", highlight=False)
    t = Table("TP", "shard GB", "KV GB", "per GPU GB", "fits", "replicas/node")
    for row in s["options"]:
        t.add_row(str(row["tp"]), f"{row['shard_gb']:.1f}", f"{row['kv_gb']:.1f}", f"{row['per_gpu_gb']:.1f}",
                  "yes" if row["fits"] else "no", str(row["replicas_per_node"]))
    out_console.print(t)
    out_console.print(f"  -> {s['command']}" if s["command"] else "  -> no TP degree fits on one node: fewer "
                      "sequences (--max-concurrent), a shorter --context or larger GPUs", highlight=False)
    out_console.print(f"Fine-tuning ({f['method']}, {f['context']} tokens, micro-batch {f['micro_batch']}, "
                      f"{f['gpus']} GPUs; activations {f['activations_gb']['checkpointing']:.1f} GB with "
                      f"activation checkpointing, {f['activations_gb']['no_checkpointing']:.1f} GB without)",
                      highlight=False)
    t = Table("ZeRO", "offload", "model state GB", "frozen base GB", "activations GB", "per GPU GB", "host GB", "fits")
    for row in f["stages"]:
        t.add_row(str(row["zero"]), "yes" if row["offload"] else "no", f"{row['model_state_gb']:.1f}",
                  f"{row['frozen_base_gb']:.1f}", f"{row['activations_gb']:.1f}", f"{row['per_gpu_gb']:.1f}",
                  f"{row['host_gb']:.1f}", "yes" if row["fits"] else "no")
    out_console.print(t)
    out_console.print(f"  -> ZeRO-{f['zero']}{' + offload' if f['offload'] else ''} fits on {f['smallest_gpus']} "
                      f"GPUs: {f['command']}" if f["command"] else
                      f"  -> ZeRO-{f['zero']} does not fit on any GPU count: try --zero 3 or --offload",
                      highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
