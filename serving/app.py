"""The Ray Serve application: an OpenAI-compatible FastAPI ingress over the batching engine.

`herd serve deploy` hands Serve the entry point `serving.app:build_app` with its arguments;
each replica loads the base model (TP=1 in process, TP=N as a group of Ray actors in the
replica's placement group), starts an engine, and answers:

    POST /v1/completions, POST /v1/chat/completions  (SSE with "stream": true)
    GET  /v1/models, GET /health, GET /metrics
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.concurrency import run_in_threadpool

from cluster.placement import app_device, device_config, resource_options
from cluster.storage import StorageError, open_storage
from llama.generation import SamplingParams
from llama.tokenizer import DialogError, encode_dialog
from serving.engine import Engine, ErrorEvent, FinishEvent, TokenEvent
from serving.engine import Request as GenRequest
from serving.metrics import ServerMetrics
from serving.models_view import ModelsView, storage_unavailable
from serving.openai_schema import APIError, ChatRequest, CompletionRequest, parse

logger = logging.getLogger("ray.serve")
api = FastAPI(title="Herd", description="OpenAI-compatible Llama 2 serving")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512
# A replica whose model runner failed this many steps in a row tells Ray Serve it is unhealthy.


def _load_runner(cfg: dict):
    storage = open_storage(cfg["storage"])
    kv = {"kv_cache_gib": cfg.get("kv_cache_gib"), "gpu_memory_utilization": cfg.get("gpu_memory_utilization") or 0.9}
    if cfg.get("tp", 1) > 1:
        from serving.tensor_parallel import DEFAULT_STEP_TIMEOUT_S, TPRunner
        return TPRunner.create(storage, cfg["model"], cfg["tp"], slots=cfg["max_batch"], max_loras=cfg["max_loras"],
                               max_lora_rank=cfg["max_lora_rank"], max_seq_len=cfg.get("max_seq_len"),
                               worker_cpus=cfg["worker_cpus"], dtype=cfg.get("dtype", "auto"),
                               step_timeout_s=float(cfg.get("tp_step_timeout_s") or DEFAULT_STEP_TIMEOUT_S),
                               device=cfg.get("device", "cpu"), setup_timeout_s=cfg.get("tp_setup_timeout_s"), **kv)
    from cluster.models import load_base
    from cluster.placement import torch_device
    from serving.kv_blocks import plan_num_blocks
    from serving.runner import LocalRunner
    model, tok = load_base(storage, cfg["model"], dtype=cfg.get("dtype", "auto"),
                           device=torch_device(cfg.get("device", "cpu")))
    param = next(model.parameters())
    max_seq_len = min(cfg.get("max_seq_len") or model.cfg.max_seq_len, model.cfg.max_seq_len)
    blocks = plan_num_blocks(model.cfg, param.dtype, param.device, 16, cfg["max_batch"], max_seq_len, **kv)
    runner = LocalRunner(model, slots=cfg["max_batch"], max_loras=cfg["max_loras"],
                         max_lora_rank=cfg["max_lora_rank"], max_seq_len=max_seq_len, num_blocks=blocks)
    return runner, tok


@serve.deployment
@serve.ingress(api)
class HerdServer:
    def __init__(self, config: dict):
        import torch
        # Load single-threaded: torch work on this thread would start an OpenMP pool that idles
        # beside the engine thread's own and slows every decode step (serving/engine.py `_loop`).
        torch.set_num_threads(1)
        self.config = config
        # The key's sha256 (`herd serve deploy` never ships the key itself), or HERD_API_KEY's on the node.
        key = os.environ.get("HERD_API_KEY")
        self.api_key_sha256 = (config.get("api_key_sha256")
                               or (hashlib.sha256(key.encode()).hexdigest() if key else None))
        self.max_body = int(config.get("max_body_bytes", 1 << 20))
        self.base = config["model"]
        self.view = ModelsView(open_storage(config["storage"], fail_fast=True), self.base,
                               ttl_s=config.get("adapter_ttl_s", 1.0))
        self.runner, self.tok = _load_runner(config)
        self.engine = Engine(self.runner, self.tok, slots=config["max_batch"], max_loras=config["max_loras"],
                             adapter_loader=self.view.load, max_waiting=config.get("max_waiting", 256),
                             stream_interval=config.get("stream_interval", 1),
                             stream_interval_ms=config.get("stream_interval_ms", 0.0),
                             speculate_tokens=int(config.get("speculate_tokens", 8)),
                             threads=max(1, int(config.get("threads", 1))))
        self.metrics = ServerMetrics()
        # Names this replica in /health and in a response header (which replica served a request).
        self.replica_id = uuid.uuid4().hex[:12]
        self.context = self.engine.max_seq_len

    # ---- plumbing -------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.api_key_sha256:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.api_key_sha256):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <HERD_API_KEY>'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise APIError(413, f"request body is {length} bytes; the limit is {self.max_body}", code="body_too_large")
        return await request.body()

    # ---- endpoints ------------------------------------------------------------------------------

    def health_problem(self) -> str | None:
        """Why this replica cannot serve (None: it can): the engine's count of consecutive failed
        steps (a CUDA error, a dead TP worker) or a stopped engine thread."""
        return self.engine.health()

    def check_health(self) -> None:
        """Called by Ray Serve every few seconds; raising makes Serve replace this replica."""
        problem = self.health_problem()
        if problem:
            raise RuntimeError(f"replica unhealthy: {problem}")

    @api.get("/health")
    def health(self):
        problem = self.health_problem()
        snap = self.engine.snapshot()
        body = {"status": "unhealthy" if problem else "ok", "model": self.base, "replica": self.replica_id,
                "storage": "degraded" if self.view.storage_degraded() else "ok",
                **{k: snap[k] for k in ("running", "waiting", "free_slots") if k in snap}}
        if problem:
            return JSONResponse({**body, "reason": problem}, status_code=503)
        return body

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except APIError as e:
            return e.response()
        try:
            return {"object": "list", "data": await run_in_threadpool(self.view.list)}
        except StorageError:
            self.view.storage_failed(StorageError("listing models failed"))
            return APIError(503, "the model storage is unreachable; retry later", code="storage_unavailable").response()

    @api.get("/metrics")
    def metrics_endpoint(self, request: Request):
        try:
            self._authorize(request)
        except APIError as e:
            return e.response()
        return Response(self.metrics.render(self.engine.snapshot(), self.view.storage_degraded()),
                        media_type="text/plain; version=0.0.4", headers={"x-herd-replica": self.replica_id})

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "chat")

    # ---- the shared path ------------------------------------------------------------------------

    async def _serve(self, request: Request, kind: str):
        adapter_label = "-"
        try:
            self._authorize(request)
            body = parse(await self._body(request), ChatRequest if kind == "chat" else CompletionRequest,
                         self.max_body)
            if ":" in body.model and not self.config.get("max_loras"):
                raise APIError(400, f"this endpoint serves no adapters (deployed with --max-loras 0); "
                                    f"use model {self.base!r}", param="model", code="model_not_found")
            adapter = await run_in_threadpool(self.view.resolve, body.model)
            adapter_label = f"{adapter[0]}@{adapter[1]}" if adapter else "base"
            prompt_ids = self._encode(body, kind)
            params = self._sampling(body, kind, len(prompt_ids))
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            req = GenRequest(prompt_ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                          stop_strings=tuple(body.stops()), adapter=adapter)
            try:
                self.engine.submit(req)
            except Engine.Overloaded as e:
                raise APIError(503, f"server overloaded: {e}; retry later", code="overloaded") from None
            except ValueError as e:  # what the engine refuses (prompt too long, no LoRA slots)
                raise APIError(400, str(e), code="invalid_request") from None
        except APIError as e:
            self.metrics.requests.labels(kind, adapter_label, str(e.status)).inc()
            return e.response()
        except Exception as e:  # noqa: BLE001 - a bug: still an OpenAI-shaped answer, and in the log
            logger.exception("request failed")
            self.metrics.requests.labels(kind, adapter_label, "500").inc()
            return APIError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        finish = None
        try:
            first = await events.get()  # a request that fails before its first token gets an HTTP error
            if body.stream and not isinstance(first, ErrorEvent):
                finish = first  # the stream owns the request from here
                self.metrics.requests.labels(kind, adapter_label, "200").inc()
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(self._sse(req, events, kind, rid, body.model, include_usage, first),
                                         media_type="text/event-stream", headers={"x-herd-replica": self.replica_id})
            ev = first
            while not isinstance(ev, (FinishEvent, ErrorEvent)):
                ev = await events.get()
            finish = ev
        finally:
            if finish is None:  # the client went away: free the slot now
                self.metrics.disconnects.inc()
                self.engine.cancel(req)
        if isinstance(finish, ErrorEvent):
            error = (storage_unavailable(body.model) if adapter is not None and self.view.storage_degraded()
                     else APIError(finish.status, finish.message, code=finish.code))
            self.metrics.requests.labels(kind, adapter_label, str(error.status)).inc()
            return error.response()
        self.metrics.requests.labels(kind, adapter_label, "200").inc()
        self._count(req, finish)
        return JSONResponse(self._final_body(kind, rid, body.model, finish),
                            headers={"x-herd-replica": self.replica_id})

    def _encode(self, body, kind: str) -> list[int]:
        if kind == "completion":
            return self.tok.encode(body.prompt, bos=True)
        try:
            return encode_dialog(self.tok, [m.model_dump() for m in body.messages])
        except DialogError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None

    def _sampling(self, body, kind: str, n_prompt: int) -> SamplingParams:
        room = self.context - n_prompt
        wanted = body.requested_max_tokens()
        if room <= 0 or (wanted is not None and wanted > room):
            raise APIError(400, f"this model's context window is {self.context} tokens; the prompt has {n_prompt} "
                                f"and max_tokens asks for {wanted or 1} more", param="max_tokens",
                           code="context_length_exceeded")
        default = DEFAULT_CHAT_TOKENS if kind == "chat" else DEFAULT_COMPLETION_TOKENS
        return SamplingParams(max_tokens=wanted or min(default, room), temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed)

    def _count(self, req: GenRequest, finish: FinishEvent) -> None:
        self.metrics.prompt_tokens.inc(finish.prompt_tokens)
        self.metrics.completion_tokens.inc(finish.completion_tokens)
        if req.first_token_at is not None:
            self.metrics.ttft.observe(req.first_token_at - req.submitted)
            if finish.completion_tokens > 1 and req.last_token_at is not None:
                self.metrics.itl.observe((req.last_token_at - req.first_token_at) / (finish.completion_tokens - 1))

    @staticmethod
    def _usage(finish: FinishEvent) -> dict:
        return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
                "total_tokens": finish.prompt_tokens + finish.completion_tokens}

    def _final_body(self, kind: str, rid: str, model: str, finish: FinishEvent) -> dict:
        reason = "length" if finish.reason == "length" else "stop"
        base = {"id": rid, "created": int(time.time()), "model": model, "usage": self._usage(finish)}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": finish.text}, "finish_reason": reason,
                      "logprobs": None}
            return {**base, "object": "chat.completion", "choices": [choice]}
        choice = {"index": 0, "text": finish.text, "finish_reason": reason, "logprobs": None}
        return {**base, "object": "text_completion", "choices": [choice]}

    async def _sse(self, req: GenRequest, events: asyncio.Queue, kind: str, rid: str, model: str,
                   include_usage: bool, first: Any = None) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: Any, reason: str | None = None, usage: dict | None = None) -> str:
            if kind == "chat":
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason,
                                                     "logprobs": None}]
            else:
                choices = [] if delta is None else [{"index": 0, "text": delta, "finish_reason": reason,
                                                     "logprobs": None}]
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        finished = False
        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            pending = first
            while True:
                ev, pending = pending or await events.get(), None
                if isinstance(ev, TokenEvent):
                    # Under load the engine runs ahead of the network: send what is ready as one chunk.
                    text = ev.text
                    while pending is None and not events.empty():
                        nxt = events.get_nowait()
                        if isinstance(nxt, TokenEvent):
                            text += nxt.text
                        else:
                            pending = nxt
                    yield chunk({"content": text} if kind == "chat" else text)
                elif isinstance(ev, FinishEvent):
                    finished = True
                    self._count(req, ev)
                    reason = "length" if ev.reason == "length" else "stop"
                    yield chunk({} if kind == "chat" else "", reason)
                    if include_usage:
                        yield chunk(None, usage=self._usage(ev))
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(ev, ErrorEvent):
                    finished = True
                    yield f"data: {json.dumps({'error': {'message': ev.message, 'type': 'server_error'}})}\n\n"
                    return
        finally:
            if not finished:  # client disconnected mid-stream: free the slot at once
                self.metrics.disconnects.inc()
                self.engine.cancel(req)


def deployment_options(args: dict) -> dict:
    """Serve options for the deployment from the CLI's arguments."""
    autoscaling = {
        "min_replicas": args.get("min_replicas", 1),
        "max_replicas": args.get("max_replicas", 1),
        "target_ongoing_requests": args.get("target_ongoing_requests", 8),
        "upscale_delay_s": args.get("upscale_delay_s", 30.0),
        "downscale_delay_s": args.get("downscale_delay_s", 600.0),
        "look_back_period_s": args.get("look_back_period_s", 30.0),
        "metrics_interval_s": args.get("metrics_interval_s", 10.0),
    }
    if autoscaling["min_replicas"] == 0:
        autoscaling["initial_replicas"] = 1
    options: dict[str, Any] = {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": args.get("max_ongoing_requests", args.get("max_batch", 32) + 64),
        "max_queued_requests": args.get("max_queued_requests", -1),
        "health_check_period_s": 5,
    }
    # One GPU per TP=1 replica or per TP worker on cuda; a TP group's bundles STRICT_PACKed on one node.
    options.update(resource_options(args.get("device", "cpu"), int(args.get("tp", 1)),
                                    args.get("replica_cpus", 1.0), args.get("worker_cpus", 1.0),
                                    args.get("placement_strategy")))
    return options


def replica_config(args: dict) -> dict:
    """The replica's configuration from the CLI's arguments (defaults filled in)."""
    return {
        "storage": args["storage"], "model": args["model"], "tp": int(args.get("tp", 1)),
        "max_batch": int(args.get("max_batch", 32)), "max_loras": int(args.get("max_loras", 8)),
        "max_lora_rank": int(args.get("max_lora_rank", 64)), "max_waiting": int(args.get("max_waiting", 256)),
        "max_body_bytes": int(args.get("max_body_bytes", 1 << 20)), "threads": int(args.get("threads", 1)),
        "adapter_ttl_s": float(args.get("adapter_ttl_s", 1.0)), "max_seq_len": args.get("max_seq_len"),
        "worker_cpus": float(args.get("worker_cpus", 1.0)), "stream_interval": int(args.get("stream_interval", 1)),
        "stream_interval_ms": float(args.get("stream_interval_ms", 0.0)),
        "dtype": str(args.get("dtype", "auto")), "speculate_tokens": int(args.get("speculate_tokens", 8)),
        **device_config(args),
        "api_key_sha256": args.get("api_key_sha256"),
    }


def build_app(args: dict):
    """The application builder Serve imports (`serving.app:build_app`)."""
    args = {**args, "device": app_device(args.get("device", "cpu"))}
    return HerdServer.options(**deployment_options(args)).bind(replica_config(args))
