"""Model runners: what the engine calls to run one batched forward over KV-cache slots.

`LocalRunner` holds the whole model in this process (TP=1). `serving/tensor_parallel.py` has the
TP=N runner with the same interface, driving N Ray actors that each hold one shard.
"""

from __future__ import annotations

from typing import Protocol

import torch

from llama.config import LlamaConfig
from llama.lora import LoraSpec
from llama.model import SlotKVCache, Transformer
from llama.multi_lora import attach_multi_lora, load_into_slot, set_rows
from llama.packed_linear import pack_linears


class Runner(Protocol):
    cfg: LlamaConfig
    max_seq_len: int  # the KV cache's length: the context window the engine enforces

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                lora_slots: torch.Tensor, last_index: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """tokens/positions [B, T], rows (cache slots) [B], lora_slots [B] -> logits [B, V] at each
        row's `last_index` (default: the last column), or [B, T, V] with `all_logits`."""
        ...

    def load_adapter(self, slot: int, spec: LoraSpec, state: dict[str, torch.Tensor]) -> None: ...


class LocalRunner:
    def __init__(self, model: Transformer, slots: int, max_loras: int, max_lora_rank: int,
                 max_seq_len: int | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        param = next(model.parameters())
        self.cache = SlotKVCache(model.cfg, slots, max_seq_len or model.cfg.max_seq_len, dtype=param.dtype,
                                 device=param.device)
        self.max_seq_len = self.cache.max_seq_len
        self.lora_layers = attach_multi_lora(model, max_loras, max_lora_rank) if max_loras > 0 else {}
        pack_linears(model)

    def forward(self, tokens, positions, rows, lora_slots, last_index=None, all_logits=False):
        return slot_forward(self.model, self.cache, self.lora_layers, tokens, positions, rows, lora_slots,
                            last_index, all_logits)

    def load_adapter(self, slot, spec, state):
        load_into_slot(self.lora_layers, slot, spec, state)


@torch.inference_mode()
def slot_forward(model: Transformer, cache: SlotKVCache, lora_layers: dict, tokens: torch.Tensor,
                 positions: torch.Tensor, rows: torch.Tensor, lora_slots: torch.Tensor,
                 last_index: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
    """One engine forward on a (possibly sharded) model: pick each row's adapter and cache slot, run."""
    if lora_layers:
        set_rows(lora_layers, lora_slots)
    cache.bind(rows, positions)
    if all_logits:
        return model(tokens, positions, cache)
    return model(tokens, positions, cache, last_only=True, last_index=last_index)[:, -1]
