"""`herd serve ...` and `herd chat`."""

from __future__ import annotations

import enum
import os
import sys
from typing import Annotated

import typer

from cluster.cli import Dtype, DtypeOpt, JsonOpt, StorageOpt, UsageProblem, emit, out_console, run_guarded
from cluster.commands_finetune import AddressOpt, ForwardAwsOpt, _say

class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def yaml_dump(config: dict) -> str:
    import yaml
    return yaml.safe_dump(config, sort_keys=False).rstrip()


serve_app = typer.Typer(help="The OpenAI-compatible endpoint on Ray Serve.", no_args_is_help=True)


@serve_app.command("deploy")
def serve_deploy(
    model: Annotated[str, typer.Option("--model", help="base model name")],
    tp: Annotated[int, typer.Option("--tp", min=1, help="tensor-parallel workers per replica")] = 1,
    min_replicas: Annotated[int, typer.Option("--min-replicas", min=0)] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas", min=1)] = 1,
    target_ongoing_requests: Annotated[float, typer.Option("--target-ongoing-requests", min=0.1)] = 8,
    max_loras: Annotated[int, typer.Option("--max-loras", min=0, help="adapters resident per replica")] = 8,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", min=1)] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="running requests per replica")] = 32,
    max_queued_requests: Annotated[int, typer.Option("--max-queued-requests",
                                                     help="waiting requests per replica before 503")] = 256,
    port: Annotated[int, typer.Option("--port")] = 8000,
    upscale_delay_s: Annotated[float, typer.Option("--upscale-delay-s", hidden=True)] = 30.0,
    downscale_delay_s: Annotated[float, typer.Option("--downscale-delay-s", hidden=True)] = 600.0,
    look_back_period_s: Annotated[float, typer.Option("--look-back-period-s", hidden=True)] = 30.0,
    metrics_interval_s: Annotated[float, typer.Option("--metrics-interval-s", hidden=True)] = 10.0,
    replica_cpus: Annotated[float, typer.Option("--replica-cpus", min=0.01)] = 1.0,
    worker_cpus: Annotated[float, typer.Option("--worker-cpus", min=0.01, help="CPUs per TP worker")] = 1.0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads per replica")] = 1,
    stream_interval: Annotated[int, typer.Option("--stream-interval", min=1,
                                                 help="stream text every N tokens (fewer, larger SSE chunks)")] = 1,
    stream_interval_ms: Annotated[float, typer.Option("--stream-interval-ms", min=0.0,
                                                      help="and at most one chunk per request every T ms")] = 0.0,
    speculate_tokens: Annotated[int, typer.Option(
        "--speculate-tokens", min=0, max=32,
        help="prompt-lookup draft tokens per greedy request while few run (0: off)")] = 8,
    dtype: DtypeOpt = Dtype.auto,
    device: Annotated[Device, typer.Option(
        "--device", help="auto: cuda when the cluster has GPUs (one per TP=1 replica or TP worker), else cpu")
    ] = Device.auto,
    max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", min=1,
                                                    help="context cap per request (default: the model's)")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        "--gpu-memory-utilization", min=0.05, max=1.0, help="fraction of GPU memory for weights + KV cache")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option("--kv-cache-gib", min=0.001,
                                                       help="KV cache size per replica (overrides the fraction)")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="seconds to wait for /health "
                                                                    "(weights download and load included)")] = 600,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the Serve config (RayService serveConfigV2 "
                                                            "format) instead of deploying")] = False,
    forward_aws_env: ForwardAwsOpt = False,
    address: AddressOpt = None, storage: StorageOpt = None, json_: JsonOpt = False,
) -> None:
    """Deploy the endpoint; returns once it answers /health."""
    from cluster import serve_control
    from cluster.storage import open_storage

    def body():
        if min_replicas > max_replicas:
            raise UsageProblem(f"--min-replicas {min_replicas} is above --max-replicas {max_replicas}")
        args = {"model": model, "tp": tp, "min_replicas": min_replicas, "max_replicas": max_replicas,
                "target_ongoing_requests": target_ongoing_requests, "max_loras": max_loras,
                "max_lora_rank": max_lora_rank, "max_batch": max_batch, "max_waiting": max_queued_requests,
                "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s,
                "look_back_period_s": look_back_period_s, "metrics_interval_s": metrics_interval_s,
                "replica_cpus": replica_cpus, "worker_cpus": worker_cpus, "threads": threads,
                "stream_interval": stream_interval, "stream_interval_ms": stream_interval_ms,
                "speculate_tokens": speculate_tokens, "dtype": dtype.value, "device": device.value,
                "max_seq_len": max_seq_len, "gpu_memory_utilization": gpu_memory_utilization,
                "kv_cache_gib": kv_cache_gib, "tp_setup_timeout_s": timeout}
        if dry_run:
            config = serve_control.deploy(open_storage(storage), args, address, port=port, dry_run=True,
                                          forward_aws=forward_aws_env)
            if json_:
                emit(config, True)
            else:
                print(yaml_dump(config))  # plain: rich would read YAML's [..] as markup
            return
        result = serve_control.deploy(open_storage(storage), args, address, port=port, wait_s=timeout, say=_say,
                                      forward_aws=forward_aws_env)
        emit(result, json_, f"endpoint ready: {result['endpoint']}/v1 serving {model!r} "
                            f"({result['running_replicas']} replica(s), TP={tp})")
    run_guarded(body)


@serve_app.command("status")
def serve_status(address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Application state, replicas and endpoint URL."""
    from cluster import serve_control

    def body():
        st = serve_control.app_status(address)
        if st is None:
            emit({"deployed": False}, json_, "no endpoint is deployed")
            raise typer.Exit(1)
        emit(st, json_, f"{st['status']}: {st['endpoint']}/v1 model {st['args'].get('model')!r}, replicas "
                        f"{st['running_replicas']} running ({', '.join(st['replicas']) or 'none'})")
    run_guarded(body)


@serve_app.command("scale")
def serve_scale(min_replicas: Annotated[int, typer.Option("--min-replicas", min=0)],
                max_replicas: Annotated[int, typer.Option("--max-replicas", min=1)],
                address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Change the autoscaling bounds of the running endpoint."""
    from cluster import serve_control

    def body():
        result = serve_control.scale(address, min_replicas, max_replicas, say=_say)
        emit(result, json_, f"scaled: min {min_replicas}, max {max_replicas} replicas "
                            f"({result['running_replicas']} running)")
    run_guarded(body)


@serve_app.command("shutdown")
def serve_shutdown(address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Remove the endpoint (the cluster keeps running)."""
    from cluster import serve_control

    def body():
        removed = serve_control.shutdown(address)
        emit({"removed": removed}, json_, "endpoint removed" if removed else "no endpoint was deployed")
    run_guarded(body)


def chat(prompt: Annotated[str, typer.Argument(help="your message")],
         adapter: Annotated[str | None, typer.Option("--adapter", help="NAME or NAME@VERSION")] = None,
         system: Annotated[str | None, typer.Option("--system", help="system prompt")] = None,
         max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 128,
         temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=2.0)] = 0.0,
         address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Chat with the deployed endpoint through the openai client, streaming the answer."""
    from cluster import serve_control

    def body():
        import openai
        base_url = serve_control.endpoint_url(address) + "/v1"
        client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("HERD_API_KEY", "none"))
        try:
            models = [m.id for m in client.models.list().data]
            base = next(m for m in models if ":" not in m)
            model = f"{base}:{adapter}" if adapter else base
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                       "content": prompt}]
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature, stream=True)
            text = []
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    text.append(delta)
                    if not json_:
                        sys.stdout.write(delta)
                        sys.stdout.flush()
        except openai.APIStatusError as e:
            raise UsageProblem(f"{e.status_code}: {e.message}") from None
        except openai.APIConnectionError as e:
            raise serve_control.ServeError(f"cannot reach the endpoint at {base_url}: {e}") from None
        if json_:
            emit({"model": model, "text": "".join(text)}, True)
        else:
            out_console.print()
    run_guarded(body)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
    app.command("chat")(chat)
