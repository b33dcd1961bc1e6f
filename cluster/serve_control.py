"""Deploying and managing the serving endpoint (the logic behind `herd serve ...` and `herd chat`).

The CLI hands Serve the entry point `serving.app:build_app` with its arguments through the
dashboard's Serve REST API (what `serve deploy` does), then waits until the endpoint answers
`/health`. `scale` re-deploys the same application with new autoscaling bounds; Serve keeps the
replicas that still fit.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request

from cluster.models import model_exists
from cluster.ray_cluster import (ensure_cluster, forward_aws_requested, forwarded_env, job_api_url, require_cluster,
                                 resolve_address)
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


def serve_config(args: dict, storage_url: str, port: int, env: dict[str, str], host: str) -> dict:
    """The Serve config Herd deploys, in the schema of `serve deploy` files and a RayService's
    `serveConfigV2` (ray.serve.schema.ServeDeploySchema)."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "serving.app:build_app",
                          "args": {**args, "storage": storage_url}, "runtime_env": {"env_vars": env}}],
    }


def _bind_host(address: str | None) -> str:
    """Loopback for the local head; every interface on a cluster Herd did not start (HERD_SERVE_HOST wins)."""
    return os.environ.get("HERD_SERVE_HOST") or ("127.0.0.1" if resolve_address(address) is None else "0.0.0.0")


def place(args: dict, url: str) -> dict:
    """Decide the device (auto -> cuda when the cluster has GPUs) and check that cuda replicas fit."""
    from cluster.placement import check_gpus, cluster_nodes, resolve_device
    nodes = cluster_nodes(url)
    device = resolve_device(args.get("device", "auto"), nodes)
    check_gpus(device, int(args.get("tp", 1)), max(1, int(args.get("min_replicas", 1))), nodes)
    return {**args, "device": device}


def api_key_sha256(key: str | None) -> str | None:
    """What the replicas get instead of HERD_API_KEY: its hash (they compare hashes in constant time)."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def deploy(storage: Storage, args: dict, address: str | None, port: int = 8000, wait_s: float = 600,
           say=print, dry_run: bool = False, forward_aws: bool | None = None,
           env: dict[str, str] | None = None) -> dict:
    """Deploy (or update) the endpoint; returns its base URL once /health answers.

    The API key is HERD_API_KEY's hash unless `args` already carry one (a re-deploy keeps what was
    deployed); `env` is the replicas' environment (default: this process's, without secrets).
    With `dry_run` nothing is contacted: the Serve config is returned as it would be deployed
    (a device left at 'auto' is then decided by `serving.app:build_app` on the cluster)."""
    args = dict(args)
    if "api_key_sha256" not in args:
        args["api_key_sha256"] = api_key_sha256(os.environ.get("HERD_API_KEY"))
    if env is None:
        env = forwarded_env(_PASS_ENV, forward_aws_requested(forward_aws))
    if dry_run:  # printed: secrets are shown as the variable they would come from
        env = {k: f"${{{k}}}" if any(w in k for w in ("KEY", "SECRET", "TOKEN", "PASSWORD")) else v
               for k, v in env.items()}
        if args.get("api_key_sha256"):
            args["api_key_sha256"] = "${HERD_API_KEY_SHA256}"
        return serve_config(args, storage.url, port, env, _bind_host(address))
    if not model_exists(storage, args["model"]):
        raise ValueError(f"unknown model {args['model']!r} in {storage.url}; see `herd models list`")
    if args.get("tp", 1) > 1:
        from cluster.models import load_config
        cfg = load_config(storage, args["model"])
        if cfg.n_kv_heads % args["tp"] or cfg.n_heads % args["tp"]:
            raise ValueError(f"--tp {args['tp']} must divide the model's {cfg.n_heads} heads and "
                             f"{cfg.n_kv_heads} key/value heads")
    url = ensure_cluster(address, say)
    args = place(args, url)
    env = dict(env)
    if args["device"] == "cuda":
        env["DS_ACCELERATOR"] = "cuda"  # the CLI's own default (cpu) must not reach GPU replicas
    _client(url).deploy_applications(serve_config(args, storage.url, port, env, _bind_host(address)))
    return wait_ready(address, url, wait_s, say)


def wait_ready(address: str | None, url: str, wait_s: float, say=print, every_s: float = 10.0) -> dict:
    """Poll until the app is RUNNING and its /health answers where Serve's proxy runs; say what the
    replicas are doing meanwhile (a 70B cold start downloads and loads weights for minutes)."""
    start = time.time()
    last, endpoint, shown = None, None, 0.0
    while time.time() - start < wait_s:
        last = app_status(address)
        if last and last["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ServeError(f"deployment failed: {last.get('message') or last['status']}")
        if last:
            endpoint = last["endpoint"]
            if last["status"] == "RUNNING" and _http_ok(f"{endpoint}/health"):
                return {**last, "endpoint": endpoint}
        if time.time() - shown >= every_s:
            shown = time.time()
            if last:
                say(f"[{time.time() - start:4.0f}s] {last['status']}: replicas "
                    f"{', '.join(last['replicas']) or 'not started'} (loading weights)")
        time.sleep(1)
    raise ServeError(f"the endpoint did not answer {endpoint or 'its'}/health within {wait_s:.0f}s (--timeout; "
                     f"last status: {last and last['status']}); see the Ray dashboard at {url}")


def _app_details(address: str | None) -> tuple[dict, dict | None]:
    details = _client(require_cluster(address)).get_serve_details()
    return details, (details.get("applications") or {}).get(APP_NAME)


def app_status(address: str | None) -> dict | None:
    """Application status, replicas, the deployed arguments and the HTTP port; None if not deployed."""
    details, app = _app_details(address)
    if not app:
        return None
    deployment = (app.get("deployments") or {}).get(DEPLOYMENT, {})
    replicas = [r.get("state") for r in deployment.get("replicas", [])]
    args = ((app.get("deployed_app_config") or {}).get("args")) or {}
    return {"status": app.get("status"), "message": app.get("message", ""), "replicas": replicas,
            "running_replicas": sum(1 for r in replicas if r == "RUNNING"), "args": args,
            "endpoint": endpoint_of(details)}


def endpoint_of(details: dict) -> str:
    """The endpoint's URL as the cluster reports it: the bound host, or the node IP of Serve's
    proxy when it listens on every interface (a head that is not this machine)."""
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        ips = sorted(p["node_ip"] for p in (details.get("proxies") or {}).values() if p.get("node_ip"))
        host = ips[0] if ips else host
    return f"http://{host}:{http.get('port', 8000)}"


def scale(address: str | None, min_replicas: int, max_replicas: int, say=print) -> dict:
    """Re-deploy the running application with new bounds (same model, same storage root)."""
    from cluster.storage import open_storage
    current = app_status(address)
    if current is None:
        raise ServeError("no endpoint is deployed; run `herd serve deploy` first")
    if min_replicas > max_replicas:
        raise ValueError(f"--min-replicas {min_replicas} is above --max-replicas {max_replicas}")
    # Everything else as deployed (API key, the replicas' environment), not the caller's shell.
    args = {"api_key_sha256": None, **current["args"], "min_replicas": min_replicas, "max_replicas": max_replicas}
    deployed = (_app_details(address)[1] or {}).get("deployed_app_config") or {}
    env = dict((deployed.get("runtime_env") or {}).get("env_vars") or {})
    port = int(current["endpoint"].rsplit(":", 1)[1])
    return deploy(open_storage(args["storage"]), args, address, port=port, say=say, env=env)


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
