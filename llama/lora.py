"""LoRA: low-rank adapters on the model's linear layers, with peft's math and peft's file format.

    y = W x + s * B (A x),   s = alpha / r   (alpha / sqrt(r) with use_rslora)

`apply_lora` wraps target layers so an adapter runs unmerged (training, or serving one adapter);
`merge_lora` folds it into the weights (export). Files are exactly what peft writes for a LoRA on
a LlamaForCausalLM: `adapter_config.json` + `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llama.config import LlamaConfig
from llama.json_file import read_json_object
from llama.weights import LAYER_NAMES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# HF short names of the linear layers LoRA may target, and their Herd module suffix.
LINEAR_TARGETS = {hf.rsplit(".", 1)[1]: herd for herd, hf in LAYER_NAMES.items() if "norm" not in herd}


class AdapterError(ValueError):
    """An adapter that does not fit (its config, its tensors, or the base model)."""


@dataclass
class LoraSpec:
    """The subset of peft's LoraConfig that changes the math; everything else is refused or ignored."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_json(self) -> dict:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.lora_alpha,
            "target_modules": sorted(self.target_modules), "lora_dropout": self.lora_dropout, "bias": "none",
            "use_rslora": self.use_rslora, "base_model_name_or_path": self.base_model_name_or_path,
            "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
        }

    @classmethod
    def from_peft_json(cls, raw: dict, source: str = CONFIG_FILE) -> "LoraSpec":
        if raw.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source}: peft_type {raw.get('peft_type')!r} is not LORA")
        r = raw.get("r")
        if not isinstance(r, int) or r <= 0:
            raise AdapterError(f"{source}: r must be a positive integer, got {r!r}")
        alpha = raw.get("lora_alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise AdapterError(f"{source}: lora_alpha must be set to a positive number, got {alpha!r}")
        unsupported = {"bias": ("none", None), "use_dora": (False, None), "fan_in_fan_out": (False, None),
                       "modules_to_save": (None, [],), "layers_to_transform": (None,), "rank_pattern": ({}, None),
                       "alpha_pattern": ({}, None), "lora_bias": (False, None),
                       "exclude_modules": (None,), "layer_replication": (None,), "target_parameters": (None,),
                       "trainable_token_indices": (None,), "use_qalora": (False, None),
                       "alora_invocation_tokens": (None,)}
        for key, ok in unsupported.items():
            if key in raw and raw[key] not in ok:
                raise AdapterError(f"{source}: {key}={raw[key]!r} is not supported by Herd")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            targets = _expand_target_pattern(targets, source)
        if not isinstance(targets, list) or not targets:
            raise AdapterError(f"{source}: target_modules must list the layers to adapt")
        bad = sorted(set(targets) - set(LINEAR_TARGETS))
        if bad:
            raise AdapterError(f"{source}: target module(s) {bad} do not exist in a Llama model "
                               f"(choose from {sorted(LINEAR_TARGETS)})")
        return cls(r=r, lora_alpha=float(alpha), target_modules=sorted(set(targets)),
                   lora_dropout=float(raw.get("lora_dropout") or 0.0), use_rslora=bool(raw.get("use_rslora")),
                   base_model_name_or_path=raw.get("base_model_name_or_path"))


def _expand_target_pattern(pattern: str, source: str) -> list[str]:
    if pattern == "all-linear":
        return sorted(LINEAR_TARGETS)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{source}: target_modules regex {pattern!r} is invalid ({e})") from e
    # peft full-matches the regex against module paths; any layer's path decides the short name.
    hits = sorted({short for short, herd in LINEAR_TARGETS.items()
                   if rx.fullmatch(f"model.layers.0.{LAYER_NAMES[herd]}")})
    if not hits:
        raise AdapterError(f"{source}: target_modules regex {pattern!r} matches no Llama layer")
    return hits


class LoraLinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (one adapter, unmerged)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init: B = 0, A random
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # lets code that reads `.weight` (shapes, dtype) keep working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


def target_paths(cfg: LlamaConfig, spec: LoraSpec) -> list[str]:
    """Herd module paths (`layers.3.attention.wq`) that the adapter touches."""
    return [f"layers.{i}.{LINEAR_TARGETS[t]}" for i in range(cfg.n_layers) for t in sorted(spec.target_modules)]


def peft_key(herd_path: str, which: str) -> str:
    """`layers.0.attention.wq`, "A" -> peft's `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    layer, module = herd_path.split(".", 2)[1], herd_path.split(".", 2)[2]
    return f"{PEFT_PREFIX}model.layers.{layer}.{LAYER_NAMES[module]}.lora_{which}.weight"


def expected_shapes(cfg: LlamaConfig, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    dims = {"attention.wq": (cfg.dim, cfg.n_heads * cfg.head_dim),
            "attention.wk": (cfg.dim, cfg.n_kv_heads * cfg.head_dim),
            "attention.wv": (cfg.dim, cfg.n_kv_heads * cfg.head_dim),
            "attention.wo": (cfg.n_heads * cfg.head_dim, cfg.dim),
            "feed_forward.w1": (cfg.dim, cfg.intermediate_size),
            "feed_forward.w3": (cfg.dim, cfg.intermediate_size),
            "feed_forward.w2": (cfg.intermediate_size, cfg.dim)}
    out = {}
    for path in target_paths(cfg, spec):
        d_in, d_out = dims[path.split(".", 2)[2]]
        out[peft_key(path, "A")] = (spec.r, d_in)
        out[peft_key(path, "B")] = (d_out, spec.r)
    return out


def validate_adapter(cfg: LlamaConfig, spec: LoraSpec, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor present with the shape the base model implies; nothing extra. Names the key."""
    state = {_strip_adapter_name(k): v for k, v in state.items()}
    expected = expected_shapes(cfg, spec)
    for key, shape in expected.items():
        if key not in state:
            raise AdapterError(f"{source}: missing tensor {key!r}")
        if tuple(state[key].shape) != shape:
            raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, the base model "
                               f"and r={spec.r} imply {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise AdapterError(f"{source}: unexpected tensor {extra[0]!r} (not a LoRA weight of the listed "
                           f"target_modules on this base model)")


def _strip_adapter_name(key: str) -> str:
    # peft drops the adapter name on save; tolerate files that kept ".default".
    return key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def apply_lora(model: nn.Module, spec: LoraSpec, state: dict[str, torch.Tensor] | None = None,
               trainable_only: bool = False) -> nn.Module:
    """Wrap the target linears with LoraLinear (in place); load `state` (peft keys) if given."""
    cfg: LlamaConfig = model.cfg
    mods = _modules(model)
    if state is not None:
        state = {_strip_adapter_name(k): v for k, v in state.items()}
    for path in target_paths(cfg, spec):
        parent_path, attr = path.rsplit(".", 1)
        base = mods[path]
        if isinstance(base, LoraLinear):
            raise AdapterError(f"{path} already carries a LoRA adapter")
        wrapped = LoraLinear(base, spec.r, spec.scaling, spec.lora_dropout)
        if state is not None:
            with torch.no_grad():
                wrapped.lora_A.copy_(state[peft_key(path, "A")])
                wrapped.lora_B.copy_(state[peft_key(path, "B")])
        setattr(mods[parent_path], attr, wrapped)
    if trainable_only:
        for name, p in model.named_parameters():
            p.requires_grad = ".lora_" in name
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft-keyed tensors of the adapter inside `model`."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[peft_key(path, "A")] = layer.lora_A.detach().contiguous().clone()
        out[peft_key(path, "B")] = layer.lora_B.detach().contiguous().clone()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s * B @ A) and unwrap the layers."""
    mods = _modules(model)
    for path, layer in lora_layers(model).items():
        parent_path, attr = path.rsplit(".", 1)
        with torch.no_grad():
            delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling
            layer.base.weight += delta.to(layer.base.weight.dtype)
        setattr(mods[parent_path], attr, layer.base)
    return model


# ---- files ------------------------------------------------------------------------------------

def save_adapter(directory: str | Path, spec: LoraSpec, state: dict[str, torch.Tensor]) -> list[str]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(spec.to_peft_json(), indent=2) + "\n")
    return [CONFIG_FILE, WEIGHTS_FILE]


def read_adapter_config(directory: str | Path) -> LoraSpec:
    path = Path(directory) / CONFIG_FILE
    raw = read_json_object(path, AdapterError, f"adapter config (a peft LoRA dir has {CONFIG_FILE})")
    return LoraSpec.from_peft_json(raw, str(path))


def load_adapter(directory: str | Path, cfg: LlamaConfig | None = None) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Read a peft LoRA dir; with `cfg`, validate it against that base model."""
    directory = Path(directory)
    spec = read_adapter_config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: adapter weights not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from e
    state = {_strip_adapter_name(k): v for k, v in state.items()}
    if cfg is not None:
        validate_adapter(cfg, spec, state, str(path))
    return spec, state
