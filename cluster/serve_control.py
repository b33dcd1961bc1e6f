"""Deploying and managing the serving endpoint (the logic behind `herd serve ...` and `herd chat`).

The CLI hands Serve the entry point `serving.app:build_app` with its arguments through the
dashboard's Serve REST API (what `serve deploy` does), then waits until the endpoint answers
`/health`. `scale` re-deploys the same application with new autoscaling bounds; Serve keeps the
replicas that still fit.
"""

from __future__ import annotations

import os
import time
import urllib.request

from cluster.models import model_exists
from cluster.ray_cluster import ensure_cluster, forwarded_env, job_api_url
from cluster.storage import Storage, StorageError

APP_NAME = "herd"
DEPLOYMENT = "HerdServer"
_PASS_ENV = ("AWS_", "HERD_", "OMP_")


class ServeError(StorageError):
    """The endpoint could not be deployed or reached (exit code 1)."""


def _client(url: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    return ServeSubmissionClient(url)


def _http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def deploy(storage: Storage, args: dict, address: str | None, port: int = 8000, wait_s: float = 300,
           say=print) -> dict:
    """Deploy (or update) the endpoint; returns its base URL once /health answers."""
    if not model_exists(storage, args["model"]):
        raise ValueError(f"unknown model {args['model']!r} in {storage.url}; see `herd models list`")
    if args.get("tp", 1) > 1:
        from cluster.models import load_config
        cfg = load_config(storage, args["model"])
        if cfg.n_kv_heads % args["tp"] or cfg.n_heads % args["tp"]:
            raise ValueError(f"--tp {args['tp']} must divide the model's {cfg.n_heads} heads and "
                             f"{cfg.n_kv_heads} key/value heads")
    url = ensure_cluster(address, say)
    env = forwarded_env(_PASS_ENV)
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": os.environ.get("HERD_SERVE_HOST", "127.0.0.1"), "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "serving.app:build_app",
                          "args": {**args, "storage": storage.url}, "runtime_env": {"env_vars": env}}],
    }
    _client(url).deploy_applications(config)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + wait_s
    last = None
    while time.time() < deadline:
        last = app_status(address)
        if last and last["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeError(f"deployment failed: {last.get('message') or last['status']}")
        if last and last["status"] == "RUNNING" and _http_ok(f"{endpoint}/health"):
            return {"endpoint": endpoint, **last}
        time.sleep(1)
    raise ServeError(f"the endpoint did not answer {endpoint}/health within {wait_s:.0f}s "
                     f"(last status: {last and last['status']}); see the Ray dashboard at {url}")


def app_status(address: str | None) -> dict | None:
    """Application status, replicas, the deployed arguments and the HTTP port; None if not deployed."""
    details = _client(job_api_url(address)).get_serve_details()
    app = (details.get("applications") or {}).get(APP_NAME)
    if not app:
        return None
    deployment = (app.get("deployments") or {}).get(DEPLOYMENT, {})
    replicas = [r.get("state") for r in deployment.get("replicas", [])]
    http = details.get("http_options") or {}
    args = ((app.get("deployed_app_config") or {}).get("args")) or {}
    return {"status": app.get("status"), "message": app.get("message", ""), "replicas": replicas,
            "running_replicas": sum(1 for r in replicas if r == "RUNNING"), "args": args,
            "endpoint": f"http://127.0.0.1:{http.get('port', 8000)}"}


def scale(address: str | None, min_replicas: int, max_replicas: int, say=print) -> dict:
    """Re-deploy the running application with new bounds (same model, same storage root)."""
    from cluster.storage import open_storage
    current = app_status(address)
    if current is None:
        raise ServeError("no endpoint is deployed; run `herd serve deploy` first")
    if min_replicas > max_replicas:
        raise ValueError(f"--min-replicas {min_replicas} is above --max-replicas {max_replicas}")
    args = {**current["args"], "min_replicas": min_replicas, "max_replicas": max_replicas}
    port = int(current["endpoint"].rsplit(":", 1)[1])
    return deploy(open_storage(args["storage"]), args, address, port=port, say=say)


def shutdown(address: str | None) -> bool:
    url = job_api_url(address)
    if app_status(address) is None:
        return False
    _client(url).delete_applications()
    deadline = time.time() + 60
    while time.time() < deadline and app_status(address) is not None:
        time.sleep(0.5)
    return True


def endpoint_url(address: str | None) -> str:
    """The deployed endpoint's URL (HERD_ENDPOINT overrides, e.g. behind a load balancer)."""
    if os.environ.get("HERD_ENDPOINT"):
        return os.environ["HERD_ENDPOINT"].rstrip("/")
    status = app_status(address)
    if status is None:
        raise ServeError("no endpoint is deployed; run `herd serve deploy --model M` first")
    return status["endpoint"]
