"""The deployed endpoint on a real local Ray Serve, through the real openai client."""

import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapters import random_adapter
from clirun import herd, herd_json
from conftest import serve_port
from cluster.local_inference import generate_text
from cluster.models import create_tiny_model, load_config
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage

API_KEY = "test-key-123"
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_cluster):
    """One deployment for the module: tiny base + 3 adapters (+ a v2 for promote), API key on."""
    root = tmp_path_factory.mktemp("serve")
    url = str(root / "storage")
    storage = open_storage(url)
    create_tiny_model(storage, "base")
    cfg = load_config(storage, "base")
    reg = AdapterRegistry(storage)
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    for i, name in enumerate(["a1", "a2", "a3"]):
        reg.push(random_adapter(root / name, cfg, r=4 + 2 * i, alpha=64, targets=targets, seed=i), name)
    reg.push(random_adapter(root / "a1v2", cfg, r=4, alpha=64, targets=targets, seed=99), "a1")  # v2, not current
    port = serve_port()
    mp = pytest.MonkeyPatch()
    mp.setenv("HERD_API_KEY", API_KEY)
    out = herd_json("serve", "deploy", "--model", "base", "--port", str(port), "--max-loras", "4",
                    "--max-batch", "16", "--min-replicas", "1", "--max-replicas", "3",
                    "--target-ongoing-requests", "2", "--upscale-delay-s", "2", "--downscale-delay-s", "8",
                    "--look-back-period-s", "3", "--metrics-interval-s", "1", "--replica-cpus", "0.5",
                    storage=url)
    assert out["status"] == "RUNNING" and out["endpoint"] == f"http://127.0.0.1:{port}"
    yield {"url": f"http://127.0.0.1:{port}", "storage": url, "registry": reg}
    herd("serve", "shutdown")
    mp.undo()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _local(served, prompt, max_tokens, adapter=None):
    return generate_text(served["storage"], "base", prompt, adapter=adapter, max_tokens=max_tokens)["text"]


def test_openai_client_completions_and_chat(client, served):
    models = [m.id for m in client.models.list().data]
    assert models[0] == "base" and {"base:a1", "base:a2", "base:a3"} <= set(models)
    done = client.completions.create(model="base", prompt="In the beginning", max_tokens=12, temperature=0)
    assert done.choices[0].text == _local(served, "In the beginning", 12)
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base:a2", prompt="In the beginning", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == _local(served, "In the beginning", 12, adapter="a2")
    chat = client.chat.completions.create(model="base:a1", messages=[{"role": "user", "content": "Who?"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="base:a1", messages=[{"role": "user", "content": "Who?"}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_http_ingress_is_haproxy(served):
    """On the local head, HAProxy (not Serve's Python proxy) holds the endpoint's port."""
    from cluster.ray_cluster import _haproxy_dir
    state = _haproxy_dir(os.environ["HERD_GCS_PORT"])
    configs = list(state.glob("*/haproxy.cfg"))
    port = served["url"].rsplit(":", 1)[1]
    assert configs and any(f":{port}" in c.read_text() for c in configs), configs
    running = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if str(state).encode() in p.read_bytes()]
    assert any(b"haproxy" in cmd for cmd in running)
    assert httpx.get(served["url"] + "/health", timeout=10).json()["status"] == "ok"


def test_concurrent_mixed_adapters_equal_single_requests(client, served):
    jobs = [("base", None), ("base:a1", "a1"), ("base:a2", "a2"), ("base:a3", "a3")] * 2
    prompts = ["In the beginning", "And God said", "The LORD is my shepherd", "Blessed are",
               "And it came to pass in those days", "Let there be", "For God so loved", "Amen"]
    results = [None] * 8

    def run(i):
        model, _ = jobs[i]
        results[i] = client.completions.create(model=model, prompt=prompts[i], max_tokens=6 + 3 * i,
                                               temperature=0).choices[0].text
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (_, adapter) in enumerate(jobs):
        assert results[i] == _local(served, prompts[i], 6 + 3 * i, adapter=adapter), (i, adapter)


def test_errors_are_openai_shaped(client, served):
    url = served["url"]
    bad_key = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.completions.create(model="base", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/health").status_code == 200  # no key needed
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="base:ghost", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="llama2-70b", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="word " * 600, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="x", max_tokens=600)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="x", stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "[INST] x"}])
    assert e.value.body["param"] == "messages"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x", "warp": 9}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "warp"
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x" * (2 << 20)}, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def _on_replica(url, replica, path, timeout=120):
    """GET `path` from one replica: the ingress spreads calls over the replicas, so ask until that
    one answers (each answer names its replica in `x-herd-replica`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = httpx.get(url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        if r.headers.get("x-herd-replica") == replica or (path == "/health" and r.json()["replica"] == replica):
            return r
    raise AssertionError(f"replica {replica} did not answer {path} in {timeout}s")


def _disconnects_on(url, replica) -> float:
    text = _on_replica(url, replica, "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("herd_client_disconnects_total ")))


def test_client_disconnect_frees_the_slot(served):
    """The replica that served a stream the client left frees its slot at once: asked of that
    replica, not of whichever answers. (No earlier test in this module leaves a request early.)"""
    url = served["url"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # sampled, so one token per step (no speculation): far from done when the client leaves
    body = {"model": "base", "prompt": "In the beginning", "max_tokens": 480, "temperature": 1.0, "seed": 3,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        replica = r.headers["x-herd-replica"]  # the replica that serves this stream
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.time() + 120  # a loaded machine notices the disconnect late
    while time.time() < deadline and _disconnects_on(url, replica) < 1:
        time.sleep(0.2)
    assert _disconnects_on(url, replica) == 1  # it saw the client leave (a finished request is not counted)
    while time.time() < deadline and _on_replica(url, replica, "/health").json()["running"]:
        time.sleep(0.2)
    assert _on_replica(url, replica, "/health").json()["running"] == 0


def test_promote_switches_version_without_failures(client, served):
    prompt = "And God said"
    v1, v2 = (_local(served, prompt, 10, adapter=f"a1@{v}") for v in ("v1", "v2"))
    assert v1 != v2
    answers, errors, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                answers.append((time.time(), client.completions.create(
                    model="base:a1", prompt=prompt, max_tokens=10, temperature=0).choices[0].text))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(2)
    served["registry"].promote("a1@v2")
    switched = time.time()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert {a for _, a in answers} <= {v1, v2}
        assert any(a == v1 for t, a in answers if t < switched)
        late = [a for t, a in answers if t > switched + 3]
        assert late and all(a == v2 for a in late)  # every replica serves v2 within a few seconds
    finally:
        served["registry"].promote("a1@v1")


def test_metrics_and_chat_cli(served):
    env = {"HERD_API_KEY": API_KEY, "HERD_ENDPOINT": served["url"]}
    expected = openai.OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY).chat.completions.create(
        model="base:a3", messages=[{"role": "user", "content": "Who made the light?"}], max_tokens=6,
        temperature=0).choices[0].message.content
    assert expected.strip()
    r = herd("chat", "--adapter", "a3", "--max-tokens", "6", "Who made the light?", env=env)
    assert r.output == expected + "\n"  # the streamed answer, as the endpoint gives it
    assert herd_json("chat", "--adapter", "a3", "--max-tokens", "6", "Who made the light?", env=env) == {
        "model": "base:a3", "text": expected}
    # Metrics are per replica: read them from the replica that served an a3 request (named in the
    # x-herd-replica header); with several replicas a /metrics call may land on another one.
    auth = {"Authorization": f"Bearer {API_KEY}"}
    served_by = httpx.post(served["url"] + "/v1/chat/completions", headers=auth, timeout=60, json={
        "model": "base:a3", "messages": [{"role": "user", "content": "Who made the light?"}],
        "max_tokens": 2}).headers["x-herd-replica"]
    for _ in range(200):
        r = httpx.get(served["url"] + "/metrics", headers=auth, timeout=30)
        if r.headers["x-herd-replica"] == served_by:
            break
    assert r.headers["x-herd-replica"] == served_by
    text = r.text
    for name in ("herd_requests_total", "herd_prompt_tokens_total", "herd_completion_tokens_total",
                 "herd_time_to_first_token_seconds_bucket", "herd_resident_adapters", "herd_running_requests"):
        assert name in text, name
    assert 'adapter="a3@v1"' in text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#") and len(line.split()) == 2}
    # the paged KV pool and the latency histograms of the engine
    assert values["herd_kv_blocks_free"] > 0 and values["herd_kv_blocks_used"] >= 0
    assert values["herd_preemptions"] >= 0
    assert values["herd_inter_token_latency_seconds_count"] >= 1
    assert values["herd_time_to_first_token_seconds_count"] >= 1
    assert httpx.get(served["url"] + "/metrics").status_code == 401
    st = herd_json("serve", "status")
    assert st["status"] == "RUNNING" and st["running_replicas"] >= 1


def test_autoscaling_up_under_load_and_back_down(client, served):
    """Sustained load: 1 -> >1 replicas; after it stops, back to 1 (fast delays set at deploy)."""
    def replicas():
        return herd_json("serve", "status")["running_replicas"]

    def settled_at_one(timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline and replicas() > 1:
            time.sleep(2)
        return replicas() == 1
    # the earlier tests' load may have scaled the module's deployment up: start from one replica
    assert settled_at_one(90)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            list(client.completions.create(model="base", prompt="In the beginning", max_tokens=120,
                                           temperature=0.7, stream=True))
    threads = [threading.Thread(target=load) for _ in range(10)]
    for t in threads:
        t.start()
    peak, deadline = 1, time.time() + 60
    while time.time() < deadline and peak < 2:
        time.sleep(1)
        peak = max(peak, replicas())
    stop.set()
    for t in threads:
        t.join()
    assert peak >= 2
    assert settled_at_one(90)


def test_deployed_config_holds_no_secrets(served):
    """What the Ray dashboard shows of the application: the key's hash, never the key."""
    import hashlib
    import json
    from cluster import serve_control
    shown = json.dumps(serve_control._client(serve_control.job_api_url(None)).get_serve_details())
    assert API_KEY not in shown and hashlib.sha256(API_KEY.encode()).hexdigest() in shown
    health = httpx.get(served["url"] + "/health").json()  # unauthenticated: nothing about adapters
    assert set(health) == {"status", "model", "replica", "storage", "running", "waiting", "free_slots"}
    r = httpx.post(served["url"] + "/v1/completions", json={"model": "base:ghost", "prompt": "x"},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and served["storage"] not in r.text


def _deployed_env() -> dict:
    from cluster import serve_control
    return serve_control._app_details(None)[1]["deployed_app_config"]["runtime_env"]["env_vars"]


def test_scale_sets_replica_bounds(served):
    env_before = _deployed_env()
    assert env_before.get("HERD_GCS_PORT")
    # from a shell without HERD_API_KEY and with a variable of its own: the deployed key and
    # environment stay as deployed (nothing of the scaling shell reaches the replicas)
    out = herd_json("serve", "scale", "--min-replicas", "2", "--max-replicas", "3",
                    env={"HERD_API_KEY": None, "HERD_CACHE_DIR": None, "HERD_ONLY_IN_THE_SCALING_SHELL": "1"})
    assert out["args"]["min_replicas"] == 2 and out["args"]["storage"] == served["storage"]
    assert _deployed_env() == env_before
    deadline = time.time() + 60
    while time.time() < deadline and herd_json("serve", "status")["running_replicas"] < 2:
        time.sleep(1)
    assert herd_json("serve", "status")["running_replicas"] >= 2
    assert httpx.post(served["url"] + "/v1/completions", json={"model": "base", "prompt": "x"}).status_code == 401
    r = herd("serve", "scale", "--min-replicas", "3", "--max-replicas", "2", expect=2)
    assert "above --max-replicas" in r.output


def _malformed_bodies(kind: str) -> list[bytes]:
    """>= 100 malformed (or edge-case) bodies for one endpoint: wrong types, huge numbers, NaN,
    huge seeds with sampling on, unknown roles, bad model names, invalid UTF-8, broken JSON."""
    import json
    import random
    base = ({"model": "base", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 2} if kind == "chat"
            else {"model": "base", "prompt": "In the beginning", "max_tokens": 2})
    junk = [None, True, -1, 0, 1.5, 10**30, -10**30, "x", "", [], [1], {}, {"a": 1}, "\u00e9\u00e8\U0001F600"]
    fields = {"model": junk + ["base:", "base:@", ":a1", "base:a1@v999", "base:../x", "base::", "base:A B", "other"],
              "max_tokens": junk + [10**6, 2**63], "max_completion_tokens": junk,
              "temperature": junk + [5, -0.1, 1e308], "top_p": junk + [2, 1e-300],
              "n": junk + [2], "stop": junk + [["a"] * 5, [""], [1, 2]],
              "seed": junk + [2**64, -2**63 - 1, 2**70, 10**40], "stream": junk, "stream_options": junk,
              "presence_penalty": [1, "x"], "logprobs": [True, 5], "user": [1, {}], "warp": [1]}
    if kind == "chat":
        fields["messages"] = junk + [[{"role": "robot", "content": "x"}], [{"role": "user"}],
                                     [{"role": "user", "content": 7}], [{"content": "x"}],
                                     [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                     [{"role": "user", "content": [{"type": "text"}]}],
                                     [{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}],
                                     [{"role": "user", "content": "[INST] x"}], ["user"]]
    else:
        fields["prompt"] = junk + [["a", "b"], [1, 2, 3], "word " * 2000]
    bodies = [json.dumps({**base, k: v}).encode() for k, values in fields.items() for v in values]
    rng = random.Random(kind)
    for _ in range(40):  # pairs of mutations, seeds with sampling on
        pick = {k: rng.choice(fields[k]) for k in rng.sample(sorted(fields), 2)}
        bodies.append(json.dumps({**base, "temperature": 1.0, "seed": rng.choice(fields["seed"]), **pick}).encode())
    ok = json.dumps(base)
    bodies += [b"", b"{", b"[]", b"7", b'"x"', b"null", ok[:-1].encode(), b"\xff\xfe\x00garbage",
               ok.replace('"base"', '"b\xe9se"').encode("latin-1"), ok.encode("utf-16"),
               ok.replace("2}", "NaN}").encode(), ok.replace("2}", "Infinity}").encode(),
               ok.replace("2}", "-Infinity}").encode(), ok.replace("2}", "9" * 5000 + "}").encode(),
               ok.replace("2}", "1e400}").encode(), b"[" * 50000, ok.replace('"base"', '"\\ud800"').encode(),
               ok.replace("2}", '2, "seed": ' + "9" * 100 + ', "temperature": 1}').encode()]
    return bodies


def test_malformed_bodies_are_4xx_in_openai_shape(served):
    """A fuzz of malformed bodies on both endpoints: never a 5xx (but 503), every error has
    error.message, and the server is healthy afterwards."""
    url = served["url"]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    seen = 0
    with httpx.Client(timeout=60, headers=headers) as http:
        for kind, path in (("completion", "/v1/completions"), ("chat", "/v1/chat/completions")):
            for body in _malformed_bodies(kind):
                r = http.post(url + path, content=body)
                seen += 1
                assert r.status_code < 500 or r.status_code == 503, (path, body[:200], r.status_code, r.text[:300])
                if r.status_code >= 400:
                    error = r.json()["error"]
                    assert isinstance(error["message"], str) and error["message"], (body[:200], r.text[:300])
        assert seen >= 200
        assert http.get(url + "/health").json()["status"] == "ok"
        parts = [{"type": "text", "text": "Who "}, {"type": "text", "text": "made it?"}]
        done, plain = (http.post(url + "/v1/chat/completions", json={
            "model": "base", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]})
            for content in (parts, "Who made it?"))
    assert done.status_code == 200 and done.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
