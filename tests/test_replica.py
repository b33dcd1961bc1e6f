"""One replica of the Serve deployment, run in this process (no Ray): what it answers to requests
the engine cannot serve, and whether Ray Serve's health check sees a runner that keeps failing."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from cluster.models import create_tiny_model
from cluster.storage import open_storage
from serving import app as app_module
from serving.engine import Engine

# The deployment class as written (serve.ingress wraps it in a subclass that needs a running Serve).
Replica = next(c for c in app_module.HerdServer.func_or_class.__mro__[1:] if c.__name__ == "HerdServer")


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("replica") / "storage")
    create_tiny_model(open_storage(url), "base")
    return url


def _replica(storage_url: str, **args) -> Replica:
    return Replica(app_module.replica_config({"storage": storage_url, "model": "base", "max_batch": 4, **args}))


def _post(replica, kind: str, body: dict) -> tuple[int, dict]:
    raw = json.dumps(body).encode()
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}
    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    response = asyncio.run(replica._serve(Request(scope, receive), kind))
    return response.status_code, json.loads(response.body)


def test_adapter_request_without_lora_slots_is_a_400(storage_url):
    replica = _replica(storage_url, max_loras=0)
    try:
        for kind, body in (("completion", {"prompt": "x"}), ("chat", {"messages": [{"role": "user", "content": "x"}]})):
            status, out = _post(replica, kind, {"model": "base:a1", "max_tokens": 2, **body})
            assert status == 400 and out["error"]["param"] == "model", out
            assert "--max-loras 0" in out["error"]["message"]
        status, out = _post(replica, "completion", {"model": "base", "prompt": "x", "max_tokens": 2})
        assert status == 200 and out["usage"]["completion_tokens"] == 2
    finally:
        replica.engine.shutdown()


class _BrokenRunner:
    """The replica's runner, failing every forward (a CUDA error, a dead TP worker)."""

    def __init__(self, runner):
        self.cfg, self.max_seq_len = runner.cfg, runner.max_seq_len
        self.num_blocks, self.block_size = runner.num_blocks, runner.block_size

    def execute(self, batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def load_adapter(self, *args):
        raise RuntimeError("CUDA error")


def test_check_health_fails_after_repeated_runner_failures(storage_url):
    replica = _replica(storage_url, max_loras=0)
    replica.check_health()  # healthy
    assert replica.health()["status"] == "ok"
    replica.engine.shutdown()
    replica.engine = Engine(_BrokenRunner(replica.runner), replica.tok, slots=4)
    try:
        for _ in range(5):
            status, out = _post(replica, "completion", {"model": "base", "prompt": "x", "max_tokens": 2})
            assert status == 500 and "CUDA error" in out["error"]["message"]
        with pytest.raises(RuntimeError, match="unhealthy"):
            replica.check_health()
        answer = replica.health()
        assert answer.status_code == 503 and json.loads(answer.body)["status"] == "unhealthy"
    finally:
        replica.engine.shutdown()
