"""S3 specifics against a real SeaweedFS: credentials errors, outages, retries, multipart."""

import threading
import time

import pytest

from adapters import random_adapter
from clirun import herd
from cluster.models import create_tiny_model, load_config
from cluster.registry import AdapterRegistry
from cluster.storage import StorageError, open_storage
from seaweed import create_bucket, start_seaweed


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    return seaweed


def test_wrong_secret_is_a_clear_error_and_writes_nothing(s3_env, tmp_path, monkeypatch):
    url = "s3://herd/wrong-secret"
    storage = open_storage(url)
    create_tiny_model(storage, "base")
    adapter = random_adapter(tmp_path / "a", load_config(storage, "base"))
    before = storage.list_keys("")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    r = herd("adapters", "push", str(adapter), "--name", "x", storage=url, expect=1)
    assert "access denied for s3://herd/wrong-secret/" in r.output
    assert "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in r.output
    assert "Traceback" not in r.output
    r = herd("models", "list", storage=url, expect=1)
    assert "access denied" in r.output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert open_storage(url).list_keys("") == before


def test_missing_bucket_and_unreachable_endpoint(s3_env, monkeypatch):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/x").read_text("a")
    monkeypatch.setenv("HERD_S3_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HERD_S3_RETRIES", "1")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        open_storage("s3://herd/x").read_text("a")


def test_multipart_upload_round_trip(s3_env, tmp_path):
    storage = open_storage("s3://herd/multipart")
    big = tmp_path / "big.bin"
    payload = bytes(range(256)) * (40 * 2**20 // 256)  # 40 MiB: above the 16 MiB multipart threshold
    big.write_bytes(payload)
    storage.upload_file(big, "blobs/big.bin")
    head = storage.client.head_object(Bucket="herd", Key="multipart/blobs/big.bin")
    assert "-" in head["ETag"]  # multipart ETags carry the part count
    storage.download_file("blobs/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == payload


def test_streamed_write_goes_up_in_parts_and_reads_back_by_ranges(s3_env):
    """open_write: a multipart upload fed as the caller writes (one part buffered, even for one
    big write), nothing stored if the block fails; open_read: seekable ranged reads."""
    storage = open_storage("s3://herd/streamed")
    payload = bytes(range(256)) * (12 * 2**20 // 256)  # 12 MiB in 5 MiB parts: 3 parts
    with storage.open_write("ckpt/shard.pt", part_size=5 * 2**20) as f:
        f.write(payload[:100])
        f.write(memoryview(payload)[100:])  # one write of ~12 MiB, cut into parts
        assert len(f.buf) < 5 * 2**20 and len(f.parts) == 2
    head = storage.client.head_object(Bucket="herd", Key="streamed/ckpt/shard.pt")
    assert head["ETag"].endswith('-3"') and head["ContentLength"] == len(payload)
    with storage.open_read("ckpt/shard.pt") as f:
        assert f.read(10) == payload[:10]
        f.seek(9 * 2**20 + 7)
        assert f.read(3 * 2**20) == payload[9 * 2**20 + 7:12 * 2**20 + 7]
        f.seek(0)
        assert f.read() == payload
    with pytest.raises(RuntimeError), storage.open_write("ckpt/broken.pt", part_size=5 * 2**20) as f:
        f.write(payload)
        raise RuntimeError("the writer failed half-way")
    assert not storage.exists("ckpt/broken.pt")
    assert not storage.client.list_multipart_uploads(Bucket="herd", Prefix="streamed/").get("Uploads")
    with storage.open_write("ckpt/small.pt") as f:
        f.write(b"tiny")  # under one part: a single PUT
    assert storage.read_bytes("ckpt/small.pt") == b"tiny"


@pytest.fixture
def private_server(tmp_path, monkeypatch):
    """A SeaweedFS of this test's own, so stopping it disturbs nobody else."""
    server = start_seaweed(tmp_path / "sw")
    create_bucket(server, "herd")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def test_transient_outage_is_retried(private_server):
    storage = open_storage("s3://herd/retry")
    storage.write_text("k", "before")
    private_server.stop()
    threading.Timer(1.0, private_server.restart).start()
    t0 = time.time()
    assert storage.read_text("k") == "before"  # botocore's standard retries ride out the restart
    assert time.time() - t0 >= 0.9


def test_server_stopped_mid_publish(private_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_S3_RETRIES", "1")  # fail fast while the server is down
    storage = open_storage("s3://herd/outage")
    create_tiny_model(storage, "base")
    reg = AdapterRegistry(storage)
    cfg = load_config(storage, "base")
    reg.push(random_adapter(tmp_path / "a1", cfg, seed=1), "x")
    real_upload = storage.upload_file

    def upload_then_die(local, key):
        real_upload(local, key)
        if key.endswith("adapter_config.json"):
            private_server.stop()  # the server goes away after the first file is written
    monkeypatch.setattr(storage, "upload_file", upload_then_die)
    with pytest.raises(StorageError):
        reg.push(random_adapter(tmp_path / "a2", cfg, seed=2), "x", promote=True)
    private_server.restart()
    # /healthz answers before a restarted SeaweedFS serves every read (seen: InternalError on the
    # first GetObject); the default retry rounds are there for exactly that, so use them again.
    monkeypatch.delenv("HERD_S3_RETRIES")
    monkeypatch.setattr(storage, "upload_file", real_upload)
    assert reg.versions("x") == ["v1"] and reg.current("x") == "v1"
    version = reg.push(random_adapter(tmp_path / "a2", cfg, seed=2), "x", promote=True)
    assert reg.versions("x") == ["v1", version] and reg.current("x") == version
