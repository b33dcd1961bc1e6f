"""LoRA math and format against real peft, through the registry on both backends."""

import pytest
import torch

from adapters import random_adapter
from conftest import make_model, to_hf
from cluster.models import create_tiny_model, load_base, local_model_dir
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage
from llama.lora import LoraSpec, apply_lora, load_adapter, lora_state_dict, merge_lora

TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def reg(storage_url):
    storage = open_storage(storage_url)
    create_tiny_model(storage, "base", seed=3)
    return AdapterRegistry(storage)


def _peft_model(reg, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(local_model_dir(reg.storage, "base"), dtype=torch.float32).eval()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], use_rslora=rslora)
    peft_model = get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts B at zero; make the adapter do something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_trained_adapter_served_by_herd(reg, tmp_path, rslora):
    peft_model = _peft_model(reg, tmp_path, rslora)
    peft_model.save_pretrained(tmp_path / "peft")
    version = reg.push(tmp_path / "peft", "from-peft", base_model="base")
    model, _ = load_base(reg.storage, "base")
    reg.apply_to(model, "base", f"from-peft@{version}")
    with torch.no_grad():
        diff = (model(TOKENS) - peft_model(TOKENS).logits).abs().max().item()
        assert diff <= 1e-5, diff
        base_diff = (make_model(model.cfg)(TOKENS) - model(TOKENS)).abs().max().item()
    assert base_diff > 1e-2  # the adapter really changes the output


def test_herd_adapter_loads_in_peft(reg, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    cfg = load_base(reg.storage, "base")[0].cfg
    reg.push(random_adapter(tmp_path / "a", cfg, targets=("q_proj", "up_proj", "o_proj"), r=6, alpha=3), "ours")
    reg.pull("ours", tmp_path / "pulled")
    hf = LlamaForCausalLM.from_pretrained(local_model_dir(reg.storage, "base"), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "pulled").eval()
    model, _ = load_base(reg.storage, "base")
    reg.apply_to(model, "base", "ours")
    with torch.no_grad():
        diff = (model(TOKENS) - peft_model(TOKENS).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_merge_equals_unmerged_and_peft_merge(tmp_path, tokenizer_path):
    from peft import PeftModel
    from llama.config import preset
    cfg = preset("tiny")
    base = make_model(cfg, seed=4)
    random_adapter(tmp_path / "a", cfg, targets=("k_proj", "gate_proj", "down_proj"), rslora=True)
    spec, state = load_adapter(tmp_path / "a", cfg)
    model = apply_lora(make_model(cfg, seed=4), spec, state)
    hf = PeftModel.from_pretrained(to_hf(base, tmp_path / "hf"), tmp_path / "a").merge_and_unload()
    with torch.no_grad():
        unmerged = model(TOKENS)
        assert lora_state_dict(model).keys() == state.keys()
        merged = merge_lora(model)(TOKENS)
        ref = hf(TOKENS).logits
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert (merged - ref).abs().max().item() <= 1e-5
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_scaling_rules():
    assert LoraSpec(r=16, lora_alpha=32, target_modules=["q_proj"]).scaling == 2.0
    assert LoraSpec(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=True).scaling == 8.0


def test_only_lora_params_train():
    from llama.config import preset
    model = apply_lora(make_model(preset("tiny")), LoraSpec(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                       trainable_only=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * model.cfg.n_layers


def test_target_module_patterns():
    spec = LoraSpec.from_peft_json({"r": 2, "lora_alpha": 4, "target_modules": "all-linear"})
    assert len(spec.target_modules) == 7
    spec = LoraSpec.from_peft_json({"r": 2, "lora_alpha": 4, "target_modules": r".*\.(q_proj|v_proj)"})
    assert spec.target_modules == ["q_proj", "v_proj"]
