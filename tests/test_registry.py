"""The adapter registry on both backends: versions, current, atomic publish, validation, CLI."""

import json
import threading

import pytest
import torch

from adapters import random_adapter
from clirun import herd, herd_json
from cluster.models import create_tiny_model, load_config
from cluster.registry import AdapterRegistry, RegistryError
from cluster.storage import open_storage
from llama.lora import WEIGHTS_FILE, AdapterError


@pytest.fixture
def reg(storage_url):
    storage = open_storage(storage_url)
    create_tiny_model(storage, "base")
    return AdapterRegistry(storage)


@pytest.fixture
def cfg(reg):
    return load_config(reg.storage, "base")


def test_push_promote_pull_delete_cycle(reg, cfg, tmp_path, storage_url):
    a1 = random_adapter(tmp_path / "a1", cfg, seed=1)
    a2 = random_adapter(tmp_path / "a2", cfg, seed=2, r=8)
    out = herd_json("adapters", "push", str(a1), "--name", "chat", storage=storage_url)
    assert out == {"name": "chat", "version": "v1", "current": "v1"}  # the first version becomes current
    out = herd_json("adapters", "push", str(a2), "--name", "chat", storage=storage_url)
    assert out == {"name": "chat", "version": "v2", "current": "v1"}
    rows = herd_json("adapters", "list", storage=storage_url)
    assert rows[0]["name"] == "chat" and rows[0]["versions"] == ["v1", "v2"] and rows[0]["current"] == "v1"
    shown = herd_json("adapters", "show", "chat@v2", storage=storage_url)
    assert shown["r"] == 8 and shown["base_model"] == "base" and not shown["current"]
    assert set(shown["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    herd("adapters", "promote", "chat@v2", storage=storage_url)
    assert herd_json("adapters", "show", "chat", storage=storage_url)["version"] == "v2"
    pulled = herd_json("adapters", "pull", "chat", str(tmp_path / "pulled"), storage=storage_url)
    assert pulled["version"] == "v2"
    assert (tmp_path / "pulled" / WEIGHTS_FILE).read_bytes() == (a2 / WEIGHTS_FILE).read_bytes()
    r = herd("adapters", "delete", "chat@v2", storage=storage_url, expect=1)
    assert "current version" in r.output
    herd("adapters", "promote", "chat@v1", storage=storage_url)  # rollback
    herd("adapters", "delete", "chat@v2", storage=storage_url)
    assert reg.versions("chat") == ["v1"]
    herd("adapters", "show", "chat@v2", storage=storage_url, expect=1)
    r = herd("adapters", "delete", "chat", storage=storage_url, expect=2)  # every version needs --all
    assert "--all" in r.output and reg.versions("chat") == ["v1"]
    herd("adapters", "delete", "chat", "--all", storage=storage_url)
    assert herd_json("adapters", "list", storage=storage_url) == []
    assert reg.storage.list_keys("adapters/chat") == []


def test_delete_never_removes_a_push_in_progress(reg, cfg, tmp_path, storage_url, monkeypatch):
    from cluster import registry
    reg.push(random_adapter(tmp_path / "a", cfg, seed=1), "busy")
    in_flight = reg._claim_version("busy")  # a concurrent push: claimed, one file up, no herd.json yet
    reg.storage.upload_file(tmp_path / "a" / WEIGHTS_FILE, f"adapters/busy/{in_flight}/{WEIGHTS_FILE}")
    herd("adapters", "delete", "busy@v1", storage=storage_url)  # the last published version
    assert reg.versions("busy") == [] and reg.current("busy") is None
    assert reg.storage.exists(f"adapters/busy/{in_flight}/{WEIGHTS_FILE}")
    reg.push(random_adapter(tmp_path / "b", cfg, seed=2), "busy")
    herd("adapters", "delete", "busy", "--all", storage=storage_url)
    assert reg.storage.exists(f"adapters/busy/{in_flight}/{WEIGHTS_FILE}")  # still in progress: kept
    monkeypatch.setattr(registry, "ABANDONED_PUSH_S", -1.0)  # ... until it is older than the limit
    reg.push(random_adapter(tmp_path / "c", cfg, seed=3), "busy")
    herd("adapters", "delete", "busy", "--all", storage=storage_url)
    assert reg.storage.list_keys("adapters/busy") == []


def test_versions_are_immutable_and_checksummed(reg, cfg, tmp_path):
    reg.push(random_adapter(tmp_path / "a", cfg), "x")
    key = "adapters/x/v1/adapter_model.safetensors"
    reg.storage.write_bytes(key, reg.storage.read_bytes(key)[:-4] + b"\0\0\0\0")  # bit rot / tampering
    with pytest.raises(RegistryError, match="checksum does not match"):
        reg.pull("x@v1", tmp_path / "out")


def test_interrupted_publish_is_invisible_and_retry_succeeds(reg, cfg, tmp_path, monkeypatch):
    reg.push(random_adapter(tmp_path / "a1", cfg, seed=1), "x")
    real_upload = reg.storage.upload_file
    calls = []

    def failing_upload(local, key):
        calls.append(key)
        if key.endswith(WEIGHTS_FILE):
            raise OSError("injected failure after the first file")
        return real_upload(local, key)
    monkeypatch.setattr(reg.storage, "upload_file", failing_upload)
    with pytest.raises(OSError, match="injected"):
        reg.push(random_adapter(tmp_path / "a2", cfg, seed=2), "x", promote=True)
    assert any(k.endswith("adapter_config.json") for k in calls)  # some files were written
    assert reg.versions("x") == ["v1"] and reg.current("x") == "v1"
    monkeypatch.setattr(reg.storage, "upload_file", real_upload)
    version = reg.push(random_adapter(tmp_path / "a2", cfg, seed=2), "x", promote=True)
    assert reg.versions("x") == ["v1", version] and reg.current("x") == version


def test_half_written_version_without_herd_json_is_absent(reg, cfg, tmp_path):
    reg.push(random_adapter(tmp_path / "a", cfg), "x")
    reg.storage.upload_dir(tmp_path / "a", "adapters/x/v2")  # files, but no herd.json
    reg.storage.write_text("adapters/x/v3/herd.json", "{\"trunc")  # an incomplete herd.json
    assert reg.versions("x") == ["v1"]
    with pytest.raises(RegistryError, match="not found"):
        reg.resolve("x@v2")
    with pytest.raises(RegistryError, match="not found"):
        reg.promote("x@v3")
    assert reg.push(random_adapter(tmp_path / "b", cfg), "x") == "v4"


def test_concurrent_pushes_get_distinct_versions(reg, cfg, tmp_path):
    dirs = [random_adapter(tmp_path / f"a{i}", cfg, seed=i) for i in range(6)]
    results, errors = [], []

    def push(d):
        try:
            results.append(reg.push(d, "busy"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=push, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]
    assert reg.versions("busy") == [f"v{i}" for i in range(1, 7)]
    # every version holds the adapter its pusher sent
    sent = {(d / WEIGHTS_FILE).read_bytes() for d in dirs}
    stored = {reg.storage.read_bytes(f"adapters/busy/{v}/{WEIGHTS_FILE}") for v in results}
    assert stored == sent


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 200, "has space", "Caps", ".hidden"])
def test_bad_names_refused_before_storage(reg, cfg, tmp_path, storage_url, bad):
    before = reg.storage.list_keys("adapters")
    r = herd("adapters", "push", str(random_adapter(tmp_path / "a", cfg)), "--name", bad, storage=storage_url,
             expect=2)
    assert "invalid adapter name" in r.output
    assert reg.storage.list_keys("adapters") == before
    herd("adapters", "show", bad or "@", storage=storage_url, expect=2)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_malformed_adapters_refused(reg, cfg, tmp_path, storage_url):
    from safetensors.torch import load_file, save_file
    cases = {}
    d = random_adapter(tmp_path / "rank0", cfg)
    _edit_config(d, r=0)
    cases[d] = "r must be a positive integer"
    d = random_adapter(tmp_path / "noalpha", cfg)
    _edit_config(d, lora_alpha=None)
    cases[d] = "lora_alpha must be set"
    d = random_adapter(tmp_path / "missing", cfg)
    state = load_file(d / WEIGHTS_FILE)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, d / WEIGHTS_FILE)
    cases[d] = "missing tensor 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'"
    d = random_adapter(tmp_path / "shape", cfg)
    state = load_file(d / WEIGHTS_FILE)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 7)
    save_file(state, d / WEIGHTS_FILE)
    cases[d] = r"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape \(4, 7\)"
    d = random_adapter(tmp_path / "target", cfg)
    _edit_config(d, target_modules=["q_proj", "c_attn"])
    cases[d] = r"target module\(s\) \['c_attn'\] do not exist"
    d = random_adapter(tmp_path / "wrongbase", cfg)
    _edit_config(d, base_model_name_or_path="llama2-7b")
    cases[d] = "base model 'llama2-7b' is not in"
    bigger = tmp_path / "bigger"
    from llama.config import LlamaConfig
    big_cfg = LlamaConfig(**{**cfg.model_dump(), "dim": 128, "intermediate_size": 256})
    random_adapter(bigger, big_cfg)
    cases[bigger] = "has shape"
    for directory, message in cases.items():
        r = herd("adapters", "push", str(directory), "--name", "bad", storage=storage_url, expect=2)
        assert __import__("re").search(message, r.output.replace("\n", "")), (directory.name, r.output)
    assert reg.versions("bad") == []


def test_adapter_name_bound_to_one_base_model(reg, cfg, tmp_path):
    create_tiny_model(reg.storage, "other", seed=1)
    reg.push(random_adapter(tmp_path / "a", cfg), "x")
    with pytest.raises(AdapterError, match="already belongs to base model 'base'"):
        reg.push(random_adapter(tmp_path / "b", cfg, base="other"), "x")


def test_generate_with_adapter_differs_from_base(reg, cfg, tmp_path, storage_url):
    reg.push(random_adapter(tmp_path / "a", cfg, targets=("q_proj", "v_proj", "down_proj"), alpha=64), "x")
    reg.push(random_adapter(tmp_path / "b", cfg, seed=5, targets=("q_proj", "v_proj", "down_proj"), alpha=64), "x")
    base = herd_json("generate", "--model", "base", "--max-tokens", "16", "In the beginning", storage=storage_url)
    v1 = herd_json("generate", "--model", "base", "--adapter", "x", "--max-tokens", "16", "In the beginning",
                   storage=storage_url)
    v2 = herd_json("generate", "--model", "base", "--adapter", "x@v2", "--max-tokens", "16", "In the beginning",
                   storage=storage_url)
    assert base["token_ids"] != v1["token_ids"] and v1["token_ids"] != v2["token_ids"]
    herd("generate", "--model", "base", "--adapter", "ghost", "hi", storage=storage_url, expect=1)


def test_models_cli_on_both_backends(storage_url, tmp_path, tokenizer_path):
    from conftest import make_model
    from llama.weights import save_model
    herd("models", "create-tiny", "--name", "t", storage=storage_url)
    src = tmp_path / "hf"
    save_model(make_model(load_config(open_storage(storage_url), "t")), src)
    (src / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    herd("models", "import", str(src), "--name", "imported", storage=storage_url)
    assert [m["name"] for m in herd_json("models", "list", storage=storage_url)] == ["imported", "t"]
