"""Hugging Face weight layout: tensor names, safetensors files (single or sharded), model dirs.

A base model on disk is `config.json`, `tokenizer.model` and `model.safetensors` (or
`model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`), with HF tensor names.
Only safetensors are read here: loading never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama.config import ConfigError, LlamaConfig
from llama.model import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Herd (Meta-style) module names <-> HF module names inside one decoder layer.
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_HF_TO_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_HF_TO_TOP = {v: k for k, v in TOP_NAMES.items()}
_HERD_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight)$")


class WeightsError(ValueError):
    """Weights that do not fit the model: missing, extra, wrongly shaped, or unreadable."""


def herd_to_hf_name(name: str) -> str:
    if m := _HERD_LAYER_RE.match(name):
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.weight"
    module = name.rsplit(".", 1)[0]
    return f"{TOP_NAMES[module]}.weight"


def hf_to_herd_name(name: str) -> str | None:
    """HF tensor name -> Herd name, or None for tensors Herd does not use (rotary buffers)."""
    if m := _HF_LAYER_RE.match(name):
        if m[2] not in _HF_TO_LAYER:
            return None
        return f"layers.{m[1]}.{_HF_TO_LAYER[m[2]]}.weight"
    module = name.rsplit(".", 1)[0]
    if module in _HF_TO_TOP and name.endswith(".weight"):
        return f"{_HF_TO_TOP[module]}.weight"
    return None


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {herd_to_hf_name(k): v.detach().contiguous() for k, v in state.items()}


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf_state.items():
        herd = hf_to_herd_name(name)
        if herd is None:
            if "rotary_emb" in name:
                continue
            raise WeightsError(f"{source}: unexpected tensor {name!r} (not a LlamaForCausalLM weight)")
        out[herd] = tensor
    return out


def check_state_dict(cfg: LlamaConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Compare names and shapes against what `cfg` implies; say exactly what is off."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        hf = [herd_to_hf_name(m) for m in missing[:5]]
        raise WeightsError(f"{source}: missing tensors {hf}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise WeightsError(f"{source}: unexpected tensors {[herd_to_hf_name(e) for e in extra[:5]]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise WeightsError(f"{source}: tensor {herd_to_hf_name(name)!r} has shape "
                               f"{tuple(state[name].shape)}, config.json implies {shape}")


# ---- safetensors files --------------------------------------------------------------------

def save_safetensors(hf_state: dict[str, torch.Tensor], directory: str | Path,
                     max_shard_bytes: int | None = None) -> list[str]:
    """Write one file, or shards plus an index when the tensors exceed `max_shard_bytes`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(hf_state, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX_FILE]


def _read_safetensors(path: Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One file's tensors, each read straight onto `device` and cast there one at a time, so that a
    bf16 model bound for a GPU never exists as a whole fp32 copy in host memory."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            out = {}
            for name in f.keys():
                tensor = f.get_tensor(name)
                out[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def load_safetensors(directory: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All HF tensors of a model dir, single-file or sharded (following the index), on `device`
    (in `dtype` if given)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index_path}: not a valid safetensors index ({e})") from e
        state: dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            if "/" in fname or fname.startswith("."):
                raise WeightsError(f"{index_path}: shard name {fname!r} points outside the model dir")
            shard = _read_safetensors(directory / fname, device, dtype)
            for name, tensor in shard.items():
                if weight_map.get(name) == fname:
                    state[name] = tensor
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise WeightsError(f"{index_path}: tensors listed in the index are missing from their shards: {absent[:5]}")
        return state
    single = directory / SINGLE_FILE
    if not single.exists():
        raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
    return _read_safetensors(single, device, dtype)


# ---- whole model dirs ---------------------------------------------------------------------

def save_model(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors (HF names) into `directory`; the tokenizer is separate."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory / "config.json")
    save_safetensors(state_dict_to_hf(model.state_dict()), directory, max_shard_bytes)


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Transformer:
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: model directory not found")
    cfg = LlamaConfig.load(directory / "config.json")
    state = state_dict_from_hf(load_safetensors(directory, device=device, dtype=dtype), source=str(directory))
    check_state_dict(cfg, state, str(directory))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                       "float16": torch.float16}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16).

    Elsewhere bf16 is emulated through fp32 and costs far more than fp32 itself (bench/serve.py on
    such a CPU: 1.86x transformers in bf16 against 7.78x in fp32). HERD_CPU_BF16=0/1 overrides."""
    forced = os.environ.get("HERD_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def inference_dtype(choice: str, directory: str | Path, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to run a stored model in, for a `--dtype` choice.

    'auto' keeps the checkpoint's own dtype (config.json's torch_dtype/dtype, float32 if absent), as
    transformers and vLLM do, except that float16 on a CPU (slow fp16 kernels) becomes bfloat16
    where the CPU has native bf16, else float32 (the swap is logged: a warning, always visible),
    and float32 on a GPU becomes bfloat16 (half the bytes to read per token; vLLM's 'auto' also
    halves fp32 on GPUs).
    """
    if choice != "auto":
        if choice not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {choice!r}; choose auto, {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[choice]
    raw = json.loads((Path(directory) / "config.json").read_text())
    stored = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    dtype = DTYPE_NAMES.get(stored, torch.float32)
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        native = cpu_has_native_bf16()
        chosen = torch.bfloat16 if native else torch.float32
        logging.getLogger(__name__).warning(
            "--dtype auto: the float16 checkpoint runs in %s on this CPU (%s)", str(chosen).removeprefix("torch."),
            "native bfloat16" if native else "no native bfloat16; choose --dtype bfloat16 to force it")
        return chosen
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return torch.bfloat16
    return dtype


__all__ = [
    "ConfigError", "WeightsError", "save_model", "load_model", "inference_dtype", "DTYPE_NAMES",
    "save_safetensors", "load_safetensors",    "state_dict_to_hf", "state_dict_from_hf", "check_state_dict", "herd_to_hf_name", "hf_to_herd_name",
]
