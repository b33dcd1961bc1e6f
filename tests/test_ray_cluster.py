"""The local head's Serve ingress settings and their cleanup (cluster/ray_cluster.py)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import ray_cluster


def test_haproxy_ingress_env_is_per_cluster_and_can_be_turned_off(monkeypatch):
    for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT", "HERD_SERVE_INGRESS"):
        monkeypatch.delenv(var, raising=False)
    a, b = ray_cluster.serve_ingress_env("7001"), ray_cluster.serve_ingress_env("7002")
    assert a["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    paths = [k for k in a if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all("herd-haproxy-7001" in a[k] and "herd-haproxy-7002" in b[k] for k in paths)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "9999")  # what the user set wins
    assert ray_cluster.serve_ingress_env("7001")["RAY_SERVE_HAPROXY_STATS_PORT"] == "9999"
    monkeypatch.setenv("HERD_SERVE_INGRESS", "proxy")
    assert ray_cluster.serve_ingress_env("7001") == {}


def test_stop_haproxy_ends_only_this_clusters_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_cluster.tempfile, "gettempdir", lambda: str(tmp_path))
    ours, other = ray_cluster._haproxy_dir("7101"), ray_cluster._haproxy_dir("7102")
    for d in (ours, other):
        d.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    mine = subprocess.Popen(sleeper + ["-f", str(ours / "node" / "haproxy.cfg")])
    theirs = subprocess.Popen(sleeper + ["-f", str(other / "node" / "haproxy.cfg")])
    try:
        ray_cluster._stop_haproxy("7101")
        assert mine.wait(timeout=10) == -15
        time.sleep(0.2)
        assert theirs.poll() is None and other.exists() and not ours.exists()
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()


def _answers(url: str, within_s: float = 120) -> bool:
    """Whether the dashboard at `url` answers within `within_s` (slowly on a loaded machine)."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        if ray_cluster._dashboard_up(url):
            return True
        time.sleep(1)
    return False


@pytest.mark.usefixtures("ray_cluster")
def test_local_head_outlives_its_terminal_and_down_stops_only_it(tmp_path):
    """`herd cluster up` from a shell in its own session; the session's group gets SIGHUP and SIGTERM
    (closing the terminal, a supervisor): the head still answers. `herd cluster down` then ends that
    head and leaves the test session's own Ray cluster (`ray_cluster`) running."""
    import os
    import signal

    from clirun import herd
    from conftest import _free_port
    env = {**os.environ, "HERD_DASHBOARD_PORT": str(_free_port()), "HERD_GCS_PORT": str(_free_port()),
           "HERD_NUM_CPUS": "1"}
    env.pop("RAY_ADDRESS", None)
    url = f"http://127.0.0.1:{env['HERD_DASHBOARD_PORT']}"
    log = tmp_path / "up.log"
    shell = subprocess.Popen(["sh", "-c", f"{Path(sys.executable).parent / 'herd'} cluster up > {log} 2>&1; "
                                          "echo done >> " + str(log) + "; sleep 300"],
                             env=env, start_new_session=True)
    ports = {k: env[k] for k in ("HERD_DASHBOARD_PORT", "HERD_GCS_PORT")}
    try:
        deadline = time.time() + 600  # a loaded machine starts Ray slowly
        while time.time() < deadline and "done" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        assert "started: local Ray cluster" in log.read_text(), log.read_text()
        sid = json.loads(ray_cluster._head_state_file(env["HERD_GCS_PORT"]).read_text())["sid"]
        daemons = {pid for pid in ray_cluster._session_pids(sid)
                   if Path(f"/proc/{pid}/comm").read_text().strip() in ("gcs_server", "raylet")}
        assert len(daemons) == 2 and sid != os.getsid(shell.pid)  # the head is not in the shell's session
        os.killpg(shell.pid, signal.SIGHUP)
        os.killpg(shell.pid, signal.SIGTERM)
        assert shell.wait(timeout=60) != 0
        time.sleep(3)  # let anything the signals reached die
        assert daemons <= set(ray_cluster._session_pids(sid))
        assert _answers(url)
        out = herd("cluster", "down", env=ports)
        assert "stopped the local Ray cluster" in out.output
        assert not ray_cluster._session_pids(sid) and not ray_cluster._dashboard_up(url)
    finally:
        if shell.poll() is None:
            shell.kill()
        herd("cluster", "down", env=ports, expect=None)  # whatever failed above: no head left behind
    assert _answers(ray_cluster.local_dashboard_url())  # the session's cluster lives on
