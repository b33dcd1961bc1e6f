"""Getting trained weights out of a (possibly ZeRO-3 partitioned) model without gathering it whole.

LoRA: only the adapter's A/B tensors are gathered (a few MB even on 70B), never the frozen base.
Full fine-tune: the model is gathered one top-level block at a time (embeddings, each decoder
layer, the final norm and head); rank 0 hands each block's tensors to a `ShardWriter`, which writes
a safetensors shard as soon as it is complete and uploads it, so neither memory nor local disk
ever holds the whole model. The result is an ordinary base model in `models/<name>/`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import deepspeed
import torch
from torch import nn

from cluster.models import model_prefix
from cluster.storage import Storage
from llama.lora import lora_layers, peft_key
from llama.weights import INDEX_FILE, ShardWriter, herd_to_hf_name, plan_shards

DEFAULT_SHARD_BYTES = 4 * 2**30
GatheredParameters = deepspeed.zero.GatheredParameters  # a no-op for parameters ZeRO-3 does not partition


def lora_state(module: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """peft-keyed fp32 LoRA tensors on rank 0 (None elsewhere); collective under ZeRO-3."""
    layers = lora_layers(module)
    params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    with GatheredParameters(params, modifier_rank=None):
        if rank != 0:
            return None
        out = {}
        for path, layer in layers.items():
            out[peft_key(path, "A")] = layer.lora_A.detach().float().cpu().clone()
            out[peft_key(path, "B")] = layer.lora_B.detach().float().cpu().clone()
        return out


def _blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) in file order: embeddings, each layer, the final norm and head."""
    return ([("tok_embeddings", module.tok_embeddings)] + [(f"layers.{i}", layer) for i, layer in enumerate(module.layers)]
            + [("norm", module.norm), ("output", module.output)])


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def write_consolidated(module: nn.Module, directory: str | Path, rank: int,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, on_file=None) -> list[str] | None:
    """Write the full model's safetensors (HF names) into `directory` on rank 0, one block gathered
    at a time; every rank must call it (the gathers are collective). Returns rank 0's file list."""
    blocks = _blocks(module)
    sizes = [(herd_to_hf_name(f"{prefix}.{name}"), _numel(p) * p.element_size())
             for prefix, block in blocks for name, p in block.named_parameters()]
    writer = ShardWriter(directory, plan_shards(sizes, max_shard_bytes), on_file=on_file) if rank == 0 else None
    for prefix, block in blocks:
        params = list(block.parameters())
        with GatheredParameters(params, modifier_rank=None):
            if writer is not None:
                for name, p in block.named_parameters():
                    writer.add(herd_to_hf_name(f"{prefix}.{name}"), p.detach().cpu().clone())
    return writer.close() if writer is not None else None


def publish_full(module: nn.Module, storage: Storage, name: str, model_dir: Path, rank: int,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Stream the fine-tuned weights into `models/<name>/` (collective; rank 0 uploads).

    Each shard is uploaded and deleted as soon as it is written; the config goes last, since a
    model without config.json is not listed (the same order as `herd models import`).
    """
    prefix = model_prefix(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def upload(path: Path) -> None:
            storage.upload_file(path, f"{prefix}/{path.name}")
            if path.name != INDEX_FILE:
                path.unlink()

        files = write_consolidated(module, out, rank, max_shard_bytes, on_file=upload)
        if rank != 0:
            return
        assert files is not None
        cfg = module.cfg
        dtype = next(module.parameters()).dtype
        cfg.save(out / "config.json")
        if dtype != torch.float32:
            _set_torch_dtype(out / "config.json", dtype)
        storage.upload_file(model_dir / "tokenizer.model", f"{prefix}/tokenizer.model")
        storage.upload_file(out / "config.json", f"{prefix}/config.json")


def _set_torch_dtype(config_path: Path, dtype: torch.dtype) -> None:
    import json
    raw = json.loads(config_path.read_text())
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(raw, indent=2) + "\n")
