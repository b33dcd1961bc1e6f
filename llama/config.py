"""Model shape: Llama 2 presets and the Hugging Face `config.json` mapping.

The config is the one place that knows how many layers and heads a model has. It reads and
writes Hugging Face's `LlamaConfig` keys because that is the layout Herd stores models in
(SPEC section 2); Meta's `params.json` is converted in `llama/meta_format.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama.json_file import read_json_object


class ConfigError(ValueError):
    """A config file or preset that Herd cannot build a model from."""


class LlamaConfig(BaseModel):
    """Everything that fixes the tensor shapes and the math of one Llama model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(gt=0, description="hidden size")
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0, description="key/value heads; < n_heads is grouped-query attention")
    vocab_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="SwiGLU hidden size")
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = Field(default=4096, gt=0)
    bos_id: int = 1
    eos_id: int = 2

    @model_validator(mode="after")
    def _check_heads(self) -> "LlamaConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_parameters(self) -> int:
        """Parameter count, computed from the shapes (used by `herd plan` and benchmarks)."""
        kv = self.n_kv_heads * self.head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv * 2
        mlp = 3 * self.dim * self.intermediate_size
        per_layer = attn + mlp + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    # ---- Hugging Face config.json ---------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from HF keys; refuse keys we do not know and settings whose math we lack."""
        unknown = sorted(set(raw) - _HF_KNOWN_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {unknown}; Herd reads LlamaConfig keys only")
        for key, supported in _HF_FIXED.items():
            if key in raw and raw[key] not in supported:
                raise ConfigError(f"{source}: {key}={raw[key]!r} is not supported (expected one of {supported})")
        if raw.get("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: model_type={raw['model_type']!r}, expected 'llama'")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        rope_theta = raw.get("rope_theta")
        rope_params = raw.get("rope_parameters")  # transformers >= 5 nests it here
        if isinstance(rope_params, dict):
            if rope_params.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type={rope_params['rope_type']!r} "
                                  "is not supported (expected 'default')")
            rope_theta = rope_params.get("rope_theta", rope_theta)
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0]
        try:
            return cls(
                dim=raw["hidden_size"],
                n_layers=raw["num_hidden_layers"],
                n_heads=raw["num_attention_heads"],
                n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                vocab_size=raw["vocab_size"],
                intermediate_size=raw["intermediate_size"],
                norm_eps=raw.get("rms_norm_eps", 1e-5),
                rope_theta=rope_theta if rope_theta is not None else 10000.0,
                max_seq_len=raw.get("max_position_embeddings", 4096),
                bos_id=raw.get("bos_token_id", 1) if raw.get("bos_token_id") is not None else 1,
                eos_id=eos if eos is not None else 2,
            )
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LlamaConfig":
        raw = read_json_object(path, ConfigError, "config file")
        return cls.from_hf_dict(raw, source=str(path))


# Keys HF writes for Llama that carry no math Herd needs (or that we check in _HF_FIXED).
_HF_KNOWN_KEYS = {
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "intermediate_size", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_act", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "mlp_bias", "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache",
    "pretraining_tp", "head_dim", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "is_decoder", "is_encoder_decoder", "add_cross_attention", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "tokenizer_class", "task_specific_params",
}
_HF_FIXED: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "tie_word_embeddings": (False,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "rope_scaling": (None,),
}


def _ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU hidden size (llama/model.py FeedForward)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                             intermediate_size=_ffn_size(4096, 256)),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000,
                              intermediate_size=_ffn_size(5120, 256)),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                              intermediate_size=_ffn_size(8192, 4096, 1.3)),
    "codellama-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32016,
                                intermediate_size=_ffn_size(4096, 256), rope_theta=1e6, max_seq_len=16384),
    "codellama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32016,
                                 intermediate_size=_ffn_size(5120, 256), rope_theta=1e6, max_seq_len=16384),
    "codellama-34b": LlamaConfig(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000,
                                 intermediate_size=22016, rope_theta=1e6, max_seq_len=16384),
    # Tiny shapes for tests and the demo; vocab matches the tokenizer Herd trains (llama/tiny.py).
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000,
                        intermediate_size=192, max_seq_len=512),
    "tiny-mha": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=1000,
                            intermediate_size=192, max_seq_len=512),
    "small": LlamaConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=1000,
                         intermediate_size=1376, max_seq_len=1024),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
