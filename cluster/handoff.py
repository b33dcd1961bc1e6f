"""The train -> serve hand-off that `herd finetune submit --follow` prints when a job succeeds.

A published adapter is called as `<base>:<adapter>` on any OpenAI client. When an endpoint for
that base is deployed and the job was submitted with `--promote`, the new version is live on the
running replicas within about a second (serving/models_view.py re-resolves names every second):
this module checks it through the HTTP API instead of claiming it, by waiting until
`/v1/models` lists the adapter with the new version current and a chat request to the pinned
version (`<base>:<adapter>@vN`) and to the plain name both answer. The check never fails the
job; it only reports what it saw.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request


def model_to_call(record: dict) -> str | None:
    """`<base>:<adapter>` for a published adapter, the model name for a full fine-tune."""
    result = record.get("result") or {}
    if result.get("kind") == "adapter":
        return f"{record['spec']['model']}:{result['name']}"
    if result.get("kind") == "model":
        return result["name"]
    return None


def _request(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("HERD_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['HERD_API_KEY']}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _chat(endpoint: str, model: str) -> str:
    out = _request(f"{endpoint}/v1/chat/completions",
                   {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                    "temperature": 0})
    return out["choices"][0]["message"]["content"]


def served_version(endpoint: str, model: str) -> str | None:
    """The version `/v1/models` says `model` (`<base>:<adapter>`) resolves to now; None if unlisted."""
    listed = _request(f"{endpoint}/v1/models", timeout=10)["data"]
    return next((m.get("current_version") for m in listed if m["id"] == model), None)


def confirm_served(endpoint: str, model: str, version: str, wait_s: float = 30.0) -> float:
    """Wait until the endpoint serves `version` of `model`; returns the seconds it took (raises on timeout)."""
    start = time.time()
    last: object = None
    while True:
        try:
            if served_version(endpoint, model) == version:
                _chat(endpoint, f"{model}@{version}")
                _chat(endpoint, model)
                return time.time() - start
            last = f"/v1/models lists {model} at {served_version(endpoint, model)}"
        except (OSError, KeyError, ValueError) as e:
            last = e
        if time.time() - start > wait_s:
            raise TimeoutError(f"{endpoint} did not serve {model}@{version} within {wait_s:.0f}s ({last})")
        time.sleep(0.5)


def handoff_lines(record: dict, address: str | None) -> list[str]:
    """What to tell the user after a successful job: the name to call, and what the endpoint serves."""
    model = model_to_call(record)
    if record.get("state") != "SUCCEEDED" or model is None:
        return []
    result, spec = record["result"], record["spec"]
    if result["kind"] == "model":
        return [f"new base model {model!r}: serve it with `herd serve deploy --model {model}`"]
    version = result["version"]
    lines = [f"call it as model {model!r} (version {version}) on the OpenAI API"]
    from cluster import serve_control
    try:
        status = serve_control.app_status(address)
    except Exception:  # noqa: BLE001 - no cluster to ask: nothing is deployed
        status = None
    if status is None or status.get("status") != "RUNNING":
        lines.append(f"no endpoint is running; `herd serve deploy --model {spec['model']}` serves it")
        return lines
    endpoint = status["endpoint"]
    if status["args"].get("model") != spec["model"]:
        lines.append(f"the endpoint at {endpoint} serves base {status['args'].get('model')!r}, not {spec['model']!r}")
        return lines
    if not spec.get("promote"):
        lines.append(f"not promoted: {endpoint} answers '{model}@{version}'; "
                     f"`herd adapters promote {result['name']}@{version}` makes it the default")
        return lines
    try:
        took = confirm_served(endpoint, model, version)
        lines.append(f"live: {endpoint}/v1 answers {model!r} with {version} "
                     f"(confirmed {took:.1f}s after the job ended, no restart)")
    except (TimeoutError, OSError) as e:
        lines.append(f"warning: {e}")
    return lines
