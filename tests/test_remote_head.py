"""The CLI against a head that is not this machine: endpoint address, deploy progress, runtime env."""

import json

import pytest

from cluster import serve_control
from cluster.runtime_env import declared_runtime_env


def test_endpoint_address_comes_from_the_cluster():
    remote = {"http_options": {"host": "0.0.0.0", "port": 8000},
              "proxies": {"n1": {"node_id": "n1", "node_ip": "10.1.2.3", "status": "HEALTHY"}}}
    assert serve_control.endpoint_of(remote) == "http://10.1.2.3:8000"  # where Serve's proxy runs
    assert serve_control.endpoint_of({"http_options": {"host": "127.0.0.1", "port": 9001}}) == "http://127.0.0.1:9001"
    assert serve_control.endpoint_of({"http_options": {"host": "10.9.9.9", "port": 80}}) == "http://10.9.9.9:80"


def test_bind_host_is_loopback_only_for_the_local_head(monkeypatch):
    monkeypatch.delenv("HERD_SERVE_HOST", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert serve_control._bind_host(None) == "127.0.0.1"
    assert serve_control._bind_host("http://head:8265") == "0.0.0.0"
    monkeypatch.setenv("HERD_SERVE_HOST", "10.0.0.5")
    assert serve_control._bind_host("http://head:8265") == "10.0.0.5"


def test_deploy_reports_progress_and_times_out(monkeypatch):
    states = iter([None] + [{"status": "DEPLOYING", "replicas": ["STARTING", "STARTING"], "endpoint": "http://h:1"}] * 1000)
    monkeypatch.setattr(serve_control, "app_status", lambda address: next(states))
    monkeypatch.setattr(serve_control.time, "sleep", lambda s: None)
    clock = iter(range(0, 10_000, 3))
    monkeypatch.setattr(serve_control.time, "time", lambda: next(clock))
    said = []
    with pytest.raises(serve_control.ServeError, match=r"did not answer http://h:1/health within 60s \(--timeout"):
        serve_control.wait_ready("http://head:8265", "http://head:8265", 60, say=said.append, every_s=10)
    assert said and all("DEPLOYING: replicas STARTING, STARTING" in s for s in said[1:])
    assert 3 <= len(said) <= 8  # about one line per 10 s of waiting, not one per poll


def test_declared_runtime_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HERD_RUNTIME_ENV", raising=False)
    assert declared_runtime_env({"A": "1"}) == {"env_vars": {"A": "1"}}
    monkeypatch.setenv("HERD_RUNTIME_ENV", json.dumps({"image_uri": "ghcr.io/herd/herd-gpu:latest",
                                                       "env_vars": {"B": "2"}}))
    assert declared_runtime_env({"A": "1"}) == {"image_uri": "ghcr.io/herd/herd-gpu:latest",
                                                "env_vars": {"A": "1", "B": "2"}}
    (tmp_path / "env.yaml").write_text("pip: [llama-herd==0.1.0]\n")
    monkeypatch.setenv("HERD_RUNTIME_ENV", str(tmp_path / "env.yaml"))
    assert declared_runtime_env({}) == {"pip": ["llama-herd==0.1.0"], "env_vars": {}}
    monkeypatch.setenv("HERD_RUNTIME_ENV", str(tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="must be a JSON/YAML object"):
        declared_runtime_env({})
