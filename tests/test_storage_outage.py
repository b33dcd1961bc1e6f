"""The S3 server stops while the endpoint serves from it: resident adapters keep serving their
last-resolved version (storage shown as degraded), an adapter that needs the storage gets an
OpenAI-shaped 503 `storage_unavailable` within 10 s, and a version promoted meanwhile is picked
up once the storage is back."""

import time

import httpx
import pytest

from adapters import random_adapter
from clirun import herd, herd_json
from conftest import serve_port
from cluster.local_inference import generate_text
from cluster.models import create_tiny_model, load_config
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage
from seaweed import create_bucket, start_seaweed

PROMPT = "And God said"
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


@pytest.fixture(scope="module")
def outage(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("outage")
    server = start_seaweed(root / "s3")
    create_bucket(server, "herd")
    mp = pytest.MonkeyPatch()
    for key, value in server.env().items():  # with HERD_FORWARD_AWS_ENV: the replica gets the credentials
        mp.setenv(key, value)
    mp.delenv("HERD_API_KEY", raising=False)
    url = "s3://herd/outage"
    storage = open_storage(url)
    create_tiny_model(storage, "base")
    cfg = load_config(storage, "base")
    reg = AdapterRegistry(storage)
    reg.push(random_adapter(root / "a1", cfg, r=4, alpha=64, targets=TARGETS, seed=1), "a1")
    reg.push(random_adapter(root / "a1v2", cfg, r=4, alpha=64, targets=TARGETS, seed=2), "a1")  # v2, not current
    reg.push(random_adapter(root / "a2", cfg, r=4, alpha=64, targets=TARGETS, seed=3), "a2")
    expected = {ref: generate_text(url, "base", PROMPT, adapter=ref, max_tokens=8)["text"]
                for ref in ("a1@v1", "a1@v2")}
    out = herd_json("serve", "deploy", "--model", "base", "--port", str(serve_port()), "--max-loras", "2",
                    "--max-batch", "4", "--replica-cpus", "0.5", storage=url)
    try:
        yield {"url": out["endpoint"], "server": server, "registry": reg, "expected": expected}
    finally:
        herd("serve", "shutdown")
        server.stop()
        mp.undo()


def _complete(url: str, model: str, timeout: float = 60, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=timeout,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra})


def test_serving_through_a_storage_outage(outage):
    url, server, expected = outage["url"], outage["server"], outage["expected"]
    assert expected["a1@v1"] != expected["a1@v2"]
    first = _complete(url, "base:a1")
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == expected["a1@v1"]
    assert httpx.get(url + "/health").json()["storage"] == "ok"

    server.stop()
    time.sleep(1.5)  # past the 1 s resolution cache: resolving a1 now needs the storage
    during = _complete(url, "base:a1")
    assert during.status_code == 200 and during.json()["choices"][0]["text"] == expected["a1@v1"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["storage"] == "degraded"
    assert "herd_storage_degraded 1.0" in httpx.get(url + "/metrics").text
    for stream in (False, True):  # never loaded: needs the storage; the client gives up after 10 s
        r = _complete(url, "base:a2", timeout=10, stream=stream)
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        assert "s3://" not in r.text
    assert _complete(url, "base").status_code == 200  # the base model is unaffected

    server.restart()
    outage["registry"].promote("a1@v2")  # promoted while the replica still counts the storage as down
    deadline, text = time.time() + 60, None
    while time.time() < deadline and text != expected["a1@v2"]:
        r = _complete(url, "base:a1")
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        time.sleep(0.5)
    assert text == expected["a1@v2"]
    assert httpx.get(url + "/health").json()["storage"] == "ok"
    assert _complete(url, "base:a2").status_code == 200
