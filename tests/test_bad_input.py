"""Broken model files: every error names the file and the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model
from llama.config import ConfigError, LlamaConfig, preset
from llama.meta_format import load_meta_checkpoint, save_meta_checkpoint
from llama.tokenizer import Tokenizer, TokenizerError
from llama.weights import WeightsError, load_model, save_model

CFG = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=100, intermediate_size=64,
                  max_seq_len=64)


@pytest.fixture
def model_dir(tmp_path):
    save_model(make_model(CFG), tmp_path / "m")
    return tmp_path / "m"


def test_missing_dir(tmp_path):
    with pytest.raises(WeightsError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config.json: config file not found"):
        load_model(model_dir)


def test_corrupt_config(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        load_model(model_dir)


def test_unknown_config_key(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    raw["flux_capacitor"] = 1
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: unknown config keys \['flux_capacitor'\]"):
        load_model(model_dir)


def test_unsupported_math_refused(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    raw["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="rope_scaling"):
        load_model(model_dir)


def test_transformers5_rope_parameters_accepted(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (model_dir / "config.json").write_text(json.dumps(raw))
    assert load_model(model_dir).cfg.rope_theta == 1e6


def test_bad_head_counts(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    raw["num_key_value_heads"] = 3
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="not divisible by n_kv_heads"):
        load_model(model_dir)


def test_corrupt_safetensors(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(model_dir)


def test_missing_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing tensors \['model.layers.0.mlp.up_proj.weight'\]"):
        load_model(model_dir)


def test_wrong_shape(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(WeightsError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\), "
                                           r"config.json implies \(16, 32\)"):
        load_model(model_dir)


def test_unexpected_tensor(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(model_dir)


def test_missing_shard(tmp_path):
    save_model(make_model(CFG), tmp_path, max_shard_bytes=10_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    with pytest.raises(WeightsError, match=f"{shards[1].name}: weights file not found"):
        load_model(tmp_path)


def test_tokenizer_missing_and_corrupt(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"nonsense")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_meta_bad_inputs(tmp_path):
    model = make_model(CFG)
    save_meta_checkpoint(CFG, model.state_dict(), tmp_path / "meta", model_parallel=2)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "meta", broken)
    (broken / "consolidated.01.pth").unlink()
    (broken / "consolidated.02.pth").write_bytes(b"x")
    with pytest.raises(WeightsError, match="are not"):
        load_meta_checkpoint(broken)
    (broken / "consolidated.02.pth").rename(broken / "consolidated.01.pth")
    with pytest.raises(WeightsError, match="consolidated.01.pth: not a readable weights-only"):
        load_meta_checkpoint(broken)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["warp"] = 9
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"params.json: unknown params keys \['warp'\]"):
        load_meta_checkpoint(tmp_path / "meta")


def test_pickled_code_is_never_executed(tmp_path):
    """A .pth carrying a pickled object (not tensors) is refused by weights_only loading."""
    model = make_model(CFG)
    save_meta_checkpoint(CFG, model.state_dict(), tmp_path)

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path),))
    torch.save({"x": Evil()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        load_meta_checkpoint(tmp_path)
    assert tmp_path.exists()


def test_presets():
    assert preset("llama2-70b").intermediate_size == 28672 and preset("llama2-70b").n_kv_heads == 8
    assert preset("llama2-7b").intermediate_size == 11008
    assert preset("llama2-13b").intermediate_size == 13824
    assert preset("codellama-7b").rope_theta == 1e6 and preset("codellama-7b").max_seq_len == 16384
    assert 6.5e9 < preset("llama2-7b").num_parameters() < 6.8e9
    assert 68e9 < preset("llama2-70b").num_parameters() < 70e9
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("llama9")
