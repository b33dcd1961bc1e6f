"""The node-local model cache (cluster/node_cache.py): one download per node, keyed by sizes/checksums."""

import json
import threading
import uuid

import pytest

from cluster.models import create_tiny_model, import_model, local_model_dir
from cluster.node_cache import MANIFEST, CacheError, file_sha256
from cluster.storage import open_storage


@pytest.fixture
def s3(seaweed, monkeypatch, tmp_path):
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HERD_CACHE_DIR", str(tmp_path / "node-cache"))
    return open_storage(f"s3://herd/{uuid.uuid4().hex[:12]}")


def _downloads(tmp_path) -> list[dict]:
    log = tmp_path / "node-cache" / "models" / "downloads.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_import_writes_sizes_and_checksums(s3, tmp_path):
    create_tiny_model(s3, "m")
    manifest = json.loads(s3.read_text(f"models/m/{MANIFEST}"))
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.model"}
    local = local_model_dir(s3, "m")
    for name, entry in manifest["files"].items():
        assert (local / name).stat().st_size == entry["size"] and file_sha256(local / name) == entry["sha256"]


def test_many_processes_of_one_node_download_once(s3, tmp_path):
    create_tiny_model(s3, "m")
    got, errors = [], []

    def load():
        try:
            got.append(local_model_dir(open_storage(s3.url), "m"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(set(got)) == 1 and len(got) == 6
    assert len(_downloads(tmp_path)) == 1
    local_model_dir(s3, "m")
    assert len(_downloads(tmp_path)) == 1  # reused, not fetched again


def test_new_weights_under_the_same_name_get_a_new_entry(s3, tmp_path):
    create_tiny_model(s3, "m", seed=0)
    first = local_model_dir(s3, "m")
    other = tmp_path / "other"
    create_tiny_model(open_storage(str(other)), "x", seed=1)
    import_model(s3, other / "models" / "x", "m", overwrite=True)  # same file names and sizes, other bytes
    second = local_model_dir(s3, "m")
    assert second != first and len(_downloads(tmp_path)) == 2
    assert (second / "model.safetensors").read_bytes() == (other / "models/x/model.safetensors").read_bytes()


def test_a_download_that_does_not_match_the_manifest_is_never_used(s3, tmp_path):
    create_tiny_model(s3, "m")
    raw = bytearray(s3.read_bytes("models/m/model.safetensors"))
    raw[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
    s3.write_bytes("models/m/model.safetensors", bytes(raw))
    with pytest.raises(CacheError, match="checksum differs"):
        local_model_dir(s3, "m")
    assert not [p for p in (tmp_path / "node-cache" / "models").iterdir() if p.is_dir()]  # nothing half-made


def test_models_imported_before_manifests_still_load(s3, tmp_path):
    create_tiny_model(s3, "m")
    s3.delete(f"models/m/{MANIFEST}")
    assert (local_model_dir(s3, "m") / "config.json").is_file()
