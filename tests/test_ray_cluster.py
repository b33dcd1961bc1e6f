"""The local head's Serve ingress settings and their cleanup (cluster/ray_cluster.py)."""

import subprocess
import sys
import time

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
