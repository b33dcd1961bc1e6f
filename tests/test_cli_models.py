"""`herd models` and `herd generate` end to end on a local storage root."""

import os
import subprocess
import sys

import torch

from clirun import herd, herd_json
from conftest import make_model
from llama.config import LlamaConfig
from llama.meta_format import save_meta_checkpoint
from llama.weights import load_model, save_model


def test_create_list_generate(storage_dir):
    herd("models", "create-tiny", "--name", "t1", storage=storage_dir)
    rows = herd_json("models", "list", storage=storage_dir)
    assert [r["name"] for r in rows] == ["t1"]
    for f in ("config.json", "tokenizer.model", "model.safetensors"):
        assert (storage_dir / "models" / "t1" / f).is_file()
    a = herd_json("generate", "--model", "t1", "--max-tokens", "12", "In the beginning", storage=storage_dir)
    b = herd_json("generate", "--model", "t1", "--max-tokens", "12", "In the beginning", storage=storage_dir)
    assert a == b and len(a["token_ids"]) == 12 and isinstance(a["text"], str)
    s1 = herd_json("generate", "--model", "t1", "--temperature", "1.0", "--seed", "1", "x", storage=storage_dir)
    s2 = herd_json("generate", "--model", "t1", "--temperature", "1.0", "--seed", "2", "x", storage=storage_dir)
    assert s1["token_ids"] != s2["token_ids"]
    again = herd("models", "create-tiny", "--name", "t1", storage=storage_dir, expect=2)
    assert "already exists" in again.output


def test_import_hf_and_meta_layouts(storage_dir, tmp_path, tokenizer_path):
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, intermediate_size=128)
    model = make_model(cfg, seed=5)
    hf_dir, meta_dir = tmp_path / "hf", tmp_path / "meta"
    save_model(model, hf_dir, max_shard_bytes=200_000)
    save_meta_checkpoint(cfg, model.state_dict(), meta_dir, model_parallel=2)
    for d in (hf_dir, meta_dir):
        (d / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    herd("models", "import", str(hf_dir), "--name", "from-hf", storage=storage_dir)
    herd("models", "import", str(meta_dir), "--name", "from-meta", storage=storage_dir)
    tokens = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        ref = model(tokens)
        for name in ("from-hf", "from-meta"):
            got = load_model(storage_dir / "models" / name)(tokens)
            assert torch.equal(got, ref), name
    a = herd_json("generate", "--model", "from-hf", "hello", storage=storage_dir)
    b = herd_json("generate", "--model", "from-meta", "hello", storage=storage_dir)
    assert a["token_ids"] == b["token_ids"]


def test_bad_usage_exit_codes(storage_dir, tmp_path):
    for bad in ("../x", "a/b", "", "Upper", "x" * 200, "has space"):
        r = herd("models", "create-tiny", "--name", bad, storage=storage_dir, expect=2)
        assert "invalid model name" in r.output
    assert not storage_dir.exists()  # refused before touching storage
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    r = herd("models", "import", str(tmp_path / "broken"), "--name", "b", storage=storage_dir, expect=2)
    assert "config.json: not valid JSON" in r.output
    r = herd("generate", "--model", "ghost", "hi", storage=storage_dir, expect=1)
    assert "model 'ghost' not found" in r.output
    herd("generate", "--model", "x", "--max-tokens", "0", "hi", storage=storage_dir, expect=2)
    r = herd("serve", "deploy", "--model", "x", "--speculate-tokens", "-1", storage=storage_dir, expect=2)
    assert "--speculate-tokens" in r.output


def test_console_script_runs(storage_dir):
    env = {**os.environ, "HERD_STORAGE": str(storage_dir)}
    bin_dir = os.path.dirname(sys.executable)
    out = subprocess.run([os.path.join(bin_dir, "herd"), "models", "list", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]"
    bad = subprocess.run([os.path.join(bin_dir, "herd"), "models", "create-tiny", "--name", "../x"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid model name" in bad.stderr


def test_generate_in_bfloat16(storage_dir):
    herd("models", "create-tiny", "--name", "t16", storage=storage_dir)
    bf16 = herd_json("generate", "--model", "t16", "--max-tokens", "8", "--dtype", "bfloat16", "In the beginning",
                     storage=storage_dir)
    assert len(bf16["token_ids"]) == 8 and isinstance(bf16["text"], str)
    again = herd_json("generate", "--model", "t16", "--max-tokens", "8", "--dtype", "bfloat16", "In the beginning",
                      storage=storage_dir)
    assert again == bf16  # deterministic
    bad = herd("generate", "--model", "t16", "--dtype", "fp8", "hi", storage=storage_dir, expect=2)
    assert "--dtype" in bad.output
