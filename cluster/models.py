"""Base models in the storage root: `models/<name>/` in Hugging Face layout.

Herd's model code reads local folders; a model on S3 is mirrored once per node into that node's
cache (`node_cache.py`), keyed by the sizes and sha256 checksums that import writes into the
model's `manifest.json`: a model re-imported under the same name with other weights gets a new
cache entry, and a download that does not match the manifest is never used.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cluster.names import check_name
from cluster.node_cache import MANIFEST, build_manifest, ensure_cached
from cluster.storage import NotFound, Storage
from llama.config import LlamaConfig
from llama.meta_format import is_meta_dir, load_meta_checkpoint
from llama.tiny import create_tiny
from llama.tokenizer import Tokenizer
from llama.weights import INDEX_FILE, check_state_dict, inference_dtype, load_model, load_safetensors, \
    save_safetensors, state_dict_from_hf, state_dict_to_hf

MODELS = "models"


def model_prefix(name: str) -> str:
    return f"{MODELS}/{check_name(name, 'model name')}"


def list_models(storage: Storage) -> list[dict]:
    out = []
    for name in storage.list_children(MODELS):
        try:
            cfg = LlamaConfig.from_hf_dict(json.loads(storage.read_text(f"{MODELS}/{name}/config.json")))
        except (NotFound, ValueError):
            continue  # half-written or foreign folder: not a model
        out.append({"name": name, "dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
                    "kv_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
                    "parameters": cfg.num_parameters(), "max_seq_len": cfg.max_seq_len})
    return out


def load_config(storage: Storage, name: str) -> LlamaConfig:
    key = f"{model_prefix(name)}/config.json"
    try:
        raw = json.loads(storage.read_text(key))
    except NotFound:
        raise NotFound(f"model {name!r} not found in {storage.url}; see `herd models list`") from None
    return LlamaConfig.from_hf_dict(raw, source=storage.describe(key))


def model_exists(storage: Storage, name: str) -> bool:
    return storage.exists(f"{model_prefix(name)}/config.json")


def _validate_hf_dir(directory: Path) -> LlamaConfig:
    """Read everything once so that a broken model never reaches storage."""
    cfg = LlamaConfig.load(directory / "config.json")
    check_state_dict(cfg, state_dict_from_hf(load_safetensors(directory), str(directory)), str(directory))
    tok = Tokenizer(directory / "tokenizer.model")
    if tok.n_words > cfg.vocab_size:
        raise ValueError(f"{directory / 'tokenizer.model'}: {tok.n_words} tokens but the model's vocab_size "
                         f"is {cfg.vocab_size}")
    return cfg


def _publish_dir(storage: Storage, directory: Path, name: str) -> None:
    """Upload weights, tokenizer and their manifest (sizes, sha256) first, config.json last: a model
    without it is not listed."""
    prefix = model_prefix(name)
    files = sorted(str(p.relative_to(directory)) for p in directory.iterdir()
                   if p.is_file() and (p.suffix == ".safetensors" or p.name in (INDEX_FILE, "tokenizer.model")))
    storage.upload_dir(directory, prefix, files)
    storage.write_text(f"{prefix}/{MANIFEST}", json.dumps(build_manifest(directory, files + ["config.json"]),
                                                          indent=1, sort_keys=True) + "\n")
    storage.upload_file(directory / "config.json", f"{prefix}/config.json")


def import_model(storage: Storage, source: str | Path, name: str, overwrite: bool = False) -> LlamaConfig:
    """Import a HF-layout or Meta-layout folder as `models/<name>/`."""
    check_name(name, "model name")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a directory")
    if model_exists(storage, name) and not overwrite:
        raise FileExistsError(f"model {name!r} already exists in {storage.url}; pick another --name")
    if is_meta_dir(source):
        cfg, state = load_meta_checkpoint(source)
        tok = Tokenizer(source / "tokenizer.model")
        if tok.n_words > cfg.vocab_size:
            raise ValueError(f"{source / 'tokenizer.model'}: {tok.n_words} tokens but weights have {cfg.vocab_size}")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            cfg.save(out / "config.json")
            save_safetensors(state_dict_to_hf(state), out, max_shard_bytes=4 * 2**30)
            (out / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
            _publish_dir(storage, out, name)
        return cfg
    cfg = _validate_hf_dir(source)
    _publish_dir(storage, source, name)
    return cfg


def create_tiny_model(storage: Storage, name: str, preset_name: str = "tiny", seed: int = 0,
                      train_steps: int = 0, progress=None) -> LlamaConfig:
    check_name(name, "model name")
    if model_exists(storage, name):
        raise FileExistsError(f"model {name!r} already exists in {storage.url}; pick another --name")
    with tempfile.TemporaryDirectory() as tmp:
        create_tiny(tmp, preset_name, seed=seed, train_steps=train_steps, progress=progress)
        _publish_dir(storage, Path(tmp), name)
        return LlamaConfig.load(Path(tmp) / "config.json")


def local_model_dir(storage: Storage, name: str) -> Path:
    """A local folder holding the model: the storage folder itself, or a cached mirror of S3."""
    prefix = model_prefix(name)
    if not model_exists(storage, name):
        raise NotFound(f"model {name!r} not found in {storage.url}; see `herd models list`")
    local = storage.local_path(prefix)
    if local is not None:
        return local
    try:
        manifest = json.loads(storage.read_text(f"{prefix}/{MANIFEST}"))
    except NotFound:  # imported before manifests existed: key by file names, nothing to verify
        manifest = {"files": {k.split("/", 2)[-1]: {} for k in storage.list_keys(prefix)}}
    return ensure_cached(storage, prefix, name, manifest)


def load_base(storage: Storage, name: str, dtype: str = "auto", device: str = "cpu", **kwargs):
    """(model, tokenizer) for a stored base model, in the dtype a `--dtype` choice names, its
    weights read straight onto `device` (a GPU gets bf16 tensors, never a host fp32 copy)."""
    directory = local_model_dir(storage, name)
    return (load_model(directory, dtype=inference_dtype(dtype, directory, device), device=device, **kwargs),
            Tokenizer(directory / "tokenizer.model"))

