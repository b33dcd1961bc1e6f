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
    plan = plan_shards([(name, t.numel() * t.element_size()) for name, t in hf_state.items()], max_shard_bytes)
    writer = ShardWriter(directory, plan)
    for name, tensor in hf_state.items():
        writer.add(name, tensor)
    return writer.close()


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard file, in order: a new shard starts when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class ShardWriter:
    """Writes `model-0000i-of-0000N.safetensors` files as their tensors arrive, then the index.

    Only the shard being filled is held in memory, so a model can be saved a layer at a time
    (a ZeRO-3 publish gathers one layer, hands its tensors here, and releases it). `on_file` is
    called with each finished file (e.g. to upload and delete it).
    """

    def __init__(self, directory: str | Path, plan: list[list[str]], on_file=None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        self.shard_of = {name: i for i, names in enumerate(plan) for name in names}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.files: list[str] = []
        self.on_file = on_file

    def _fname(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{len(self.plan):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        i = self.shard_of[name]
        shard = self.pending.setdefault(i, {})
        shard[name] = tensor.detach().contiguous()
        if len(shard) == len(self.plan[i]):
            fname = self._fname(i)
            save_file({n: shard[n] for n in self.plan[i]}, str(self.directory / fname), metadata={"format": "pt"})
            self.total += sum(t.numel() * t.element_size() for t in shard.values())
            self.weight_map.update({n: fname for n in self.plan[i]})
            self.files.append(fname)
            del self.pending[i]
            if self.on_file is not None:
                self.on_file(self.directory / fname)

    def close(self) -> list[str]:
        missing = [n for names in self.plan for n in names if n not in self.weight_map]
        if missing:
            raise WeightsError(f"{self.directory}: tensors never written: {missing[:5]}")
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if self.on_file is not None:
            self.on_file(self.directory / INDEX_FILE)
        return self.files + [INDEX_FILE]


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


def _read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a `model.safetensors.index.json` (tensor name -> shard file)."""
    try:
        return json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path}: not a valid safetensors index ({e})") from e


def load_safetensors(directory: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All HF tensors of a model dir, single-file or sharded (following the index), on `device`
    (in `dtype` if given)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path)
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


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (single-file or sharded dir)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_index(index_path)
        if any("/" in f or f.startswith(".") for f in weight_map.values()):
            raise WeightsError(f"{index_path}: a shard name points outside the model dir")
        return {name: directory / fname for name, fname in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def tensor_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, read from the safetensors headers only (no tensor data)."""
    out: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in tensor_files(directory).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    out[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    return out


def check_model_dir(directory: str | Path) -> LlamaConfig:
    """config.json and the tensor names/shapes of a model dir agree (headers only, nothing loaded)."""
    directory = Path(directory)
    cfg = LlamaConfig.load(directory / "config.json")
    shapes = {n: s for n, s in tensor_shapes(directory).items() if "rotary_emb" not in n}
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    check_state_dict(cfg, state_dict_from_hf(meta, str(directory)), str(directory))
    return cfg


def read_flat_range(path: str | Path, name: str, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the flattened tensor `name`, reading only the rows that hold them.

    This is how a ZeRO-3 rank loads its partition (DeepSpeed partitions the flattened tensor into
    equal contiguous ranges): about 1/N of each tensor is read, never the whole model.
    """
    with safe_open(str(path), framework="pt") as f:
        sl = f.get_slice(name)
        shape = sl.get_shape()
        row = 1
        for d in shape[1:]:
            row *= d
        if not shape:
            return f.get_tensor(name).reshape(-1)[start:end]
        r0, r1 = start // row, -(-end // row)
        rows = sl[r0:r1].reshape(-1)
        return rows[start - r0 * row: end - r0 * row]


def load_model_streamed(directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> Transformer:
    """The model built on the meta device and filled tensor by tensor, already in `dtype` on `device`.

    Unlike `load_model`, no fp32 copy of the whole model is ever held in host memory: each tensor
    is read (memory-mapped), converted and moved before the next (a bf16 LoRA base on a GPU never
    exists in fp32 anywhere).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: model directory not found")
    cfg = check_model_dir(directory)
    with torch.device("meta"):
        model = Transformer(cfg)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in tensor_files(directory).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                herd = hf_to_herd_name(name)
                if herd is not None:
                    state[herd] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()


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
    "save_safetensors", "load_safetensors", "plan_shards", "ShardWriter", "tensor_files", "tensor_shapes",
    "check_model_dir", "read_flat_range", "load_model_streamed", "state_dict_to_hf", "state_dict_from_hf", "check_state_dict", "herd_to_hf_name", "hf_to_herd_name",
]
