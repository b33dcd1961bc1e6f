"""KV-cache blocks: how many the pool gets, and which request holds which.

The pool is sized once at start-up, vLLM's way: on a GPU from the memory left after the weights
(`--gpu-memory-utilization`, the fraction of the whole device Herd may use), or from an explicit
`--kv-cache-gib`; on a CPU, by default, enough for every slot to reach the full context (host
memory is not measured the same way, and CPU models are small). Requests then take blocks as
their context grows; the scheduler admits while blocks last and preempts when they run out.
"""

from __future__ import annotations

import torch

from llama.config import LlamaConfig
from llama.paged_cache import NULL_BLOCK, blocks_for, kv_bytes_per_token

GIB = 1 << 30
# Memory kept free for activations, logits and CUDA graphs beside the weights and the KV pool.
ACTIVATION_RESERVE_GIB = 2.0


def plan_num_blocks(cfg: LlamaConfig, dtype: torch.dtype, device: torch.device, block_size: int,
                    max_batch: int, max_seq_len: int, kv_cache_gib: float | None = None,
                    gpu_memory_utilization: float = 0.9, n_kv_heads: int | None = None) -> int:
    """Blocks for the pool (block 0, the scratch block, included)."""
    per_block = kv_bytes_per_token(cfg, dtype, n_kv_heads) * block_size
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {kv_cache_gib}")
        blocks = int(kv_cache_gib * GIB // per_block)
    elif device.type == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = total * gpu_memory_utilization - used - ACTIVATION_RESERVE_GIB * GIB
        blocks = int(budget // per_block)
        # never more than every slot at full context needs
        blocks = min(blocks, max_batch * blocks_for(max_seq_len, block_size) + 1)
    else:
        blocks = max_batch * blocks_for(max_seq_len, block_size) + 1
    need = blocks_for(max_seq_len, block_size) + 1
    if blocks < need:
        raise ValueError(f"the KV cache has room for {blocks} blocks of {block_size} tokens, fewer than one "
                         f"request of --max-seq-len {max_seq_len} needs ({need}): lower --max-seq-len, "
                         "or give the cache more memory (--kv-cache-gib / --gpu-memory-utilization)")
    return blocks


class BlockPool:
    """Free-list allocator of block ids 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return out

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def needed(self, table: list[int], tokens: int) -> int:
        """Blocks a request holding `table` must add to hold `tokens` positions."""
        return max(0, blocks_for(tokens, self.block_size) - len(table))
