"""Meta's checkpoint layout: `params.json`, `consolidated.NN.pth` (one per model-parallel rank).

Meta shards each weight Megatron-style across its MP ranks: embeddings by columns (dim 1),
wq/wk/wv/w1/w3 and the output head by rows (dim 0), wo/w2 by columns (dim 1); norms are
replicated. Meta's rotary embedding pairs interleaved channels, HF (and Herd) pair the two
halves of each head, so q/k rows are permuted on the way in, exactly as HF's
`convert_llama_weights_to_hf.py` does. `.pth` files are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from llama.config import ConfigError, LlamaConfig
from llama.json_file import read_json_object
from llama.weights import WeightsError, check_state_dict

# Herd name suffix -> dimension Meta concatenates its MP shards along (None: replicated).
_SHARD_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
}


def _shard_dim(name: str) -> int | None:
    for suffix, dim in _SHARD_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise WeightsError(f"unexpected tensor {name!r} in a Meta checkpoint")


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rotary pairs (Meta) -> half-split pairs (HF), per head."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def is_meta_dir(directory: str | Path) -> bool:
    return (Path(directory) / "params.json").is_file()


def _read_params(directory: Path) -> dict:
    path = directory / "params.json"
    params = read_json_object(path, ConfigError, "params.json")
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown params keys {unknown}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ConfigError(f"{path}: missing required keys {missing}")
    return params


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable weights-only torch checkpoint ({e})") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return state


def load_meta_checkpoint(directory: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a Meta-layout dir of any model-parallel count -> (config, Herd-named state dict)."""
    directory = Path(directory)
    params = _read_params(directory)
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise WeightsError(f"{directory}: no consolidated.NN.pth files next to params.json")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise WeightsError(f"{directory}: shard files {[f.name for f in files]} are not {expected}")
    shards = [_load_pth(f) for f in files]
    names = [n for n in shards[0] if n != "rope.freqs"]
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) - {"rope.freqs"} != set(names):
            raise WeightsError(f"{f}: holds different tensor names than {files[0].name}")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        dim = _shard_dim(name)
        parts = [s[name] for s in shards]
        merged[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)

    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    w1 = merged.get("layers.0.feed_forward.w1.weight")
    emb = merged.get("tok_embeddings.weight")
    if w1 is None or emb is None:
        raise WeightsError(f"{directory}: missing tok_embeddings or layers.0.feed_forward.w1")
    vocab = params.get("vocab_size", -1)
    if vocab is not None and vocab > 0 and vocab != emb.shape[0]:
        raise WeightsError(f"{directory}: params.json vocab_size {vocab} but tok_embeddings has {emb.shape[0]} rows")
    try:
        cfg = LlamaConfig(
            dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
            vocab_size=emb.shape[0], intermediate_size=w1.shape[0], norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            max_seq_len=16384 if params.get("rope_theta", 10000.0) >= 1e6 else 4096,
        )
    except ValueError as e:
        raise ConfigError(f"{directory / 'params.json'}: {e}") from e

    state = {}
    for name, w in merged.items():
        if name.endswith("attention.wq.weight"):
            w = meta_to_hf_rotary(w, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = meta_to_hf_rotary(w, cfg.n_kv_heads)
        state[name] = w.clone()
    check_state_dict(cfg, state, str(directory))
    return cfg, state


def save_meta_checkpoint(cfg: LlamaConfig, state: dict[str, torch.Tensor], directory: str | Path,
                         model_parallel: int = 1) -> None:
    """Write Herd weights in Meta's layout, split over `model_parallel` ranks (for tests/export)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "vocab_size": cfg.vocab_size, "multiple_of": 256, "norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta}
    (directory / "params.json").write_text(json.dumps(params))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(model_parallel)]
    for name, w in state.items():
        if name.endswith("attention.wq.weight"):
            w = hf_to_meta_rotary(w, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = hf_to_meta_rotary(w, cfg.n_kv_heads)
        dim = _shard_dim(name)
        parts = [w] * model_parallel if dim is None else torch.chunk(w, model_parallel, dim=dim)
        if len(parts) != model_parallel:
            raise ValueError(f"{name} with shape {tuple(w.shape)} cannot be split {model_parallel} ways")
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
