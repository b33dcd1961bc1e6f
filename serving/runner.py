"""Model runners: one engine step on the device, from host-side row lists to sampled token ids.

The scheduler hands a `StepBatch` (each row's new tokens, first position, block table, adapter
slot and sampling settings, all plain Python); the runner builds the device inputs in one
host->device copy, runs the model over the paged KV cache, samples on the device and returns the
ids in one device->host copy. Nothing in between reads a device value back (no host sync).

On CUDA, decode steps (one token per row) replay CUDA graphs captured at batch-size buckets
(1, 2, 4, 8, 16, 32, 64, ... as vLLM does) over static input buffers, with q/k/v and gate/up
fused at load and the paged-attention kernel reading K/V in place. Prefill chunks, speculative
verification and CPUs run eagerly; so does every step if capture fails (chosen automatically).

`LocalRunner` holds the whole model in this process (TP=1). `serving/tensor_parallel.py` runs
one `LocalRunner` per TP rank over a model shard; rank 0 samples and only token ids travel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from llama.config import LlamaConfig
from llama.lora import LoraSpec
from llama.model import Transformer, compile_elementwise, fuse_projections
from llama.multi_lora import attach_multi_lora, load_into_slot, set_rows
from llama.packed_linear import pack_linears
from llama.paged_attention import triton_available
from llama.paged_cache import NULL_BLOCK, PagedKVCache, blocks_for
from llama.sampler import SamplingBatch, sample

log = logging.getLogger("herd.runner")

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class StepBatch:
    """One forward's rows. Row i feeds `tokens[i]` at positions starts[i].. into its blocks."""
    tokens: list[list[int]]
    starts: list[int]
    tables: list[list[int]]
    lora_slots: list[int]
    sampling: SamplingBatch
    verify: bool = False  # also return the argmax at every position (speculative verification)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class StepOutput:
    sampled: list[int]  # per row: the token sampled after its last input token (position 0 with verify)
    picks: list[list[int]] | None = None  # with verify: the argmax after each input position


class Runner(Protocol):
    cfg: LlamaConfig
    max_seq_len: int  # the context window the engine enforces
    num_blocks: int
    block_size: int

    def execute(self, batch: StepBatch) -> StepOutput: ...

    def load_adapter(self, slot: int, spec: LoraSpec, state: dict[str, torch.Tensor]) -> None: ...


def bucket_for(rows: int) -> int | None:
    return next((b for b in GRAPH_BUCKETS if b >= rows), None)


class LocalRunner:
    """The model, its paged KV cache and LoRA slots on one device.

    `num_blocks` is the pool size (serving/kv_blocks.py plans it); without it the pool holds
    `slots` requests at the full context, as a contiguous cache would."""

    def __init__(self, model: Transformer, slots: int, max_loras: int, max_lora_rank: int,
                 max_seq_len: int | None = None, num_blocks: int | None = None, block_size: int = 16,
                 cuda_graphs: bool | None = None, sample_on_this_rank: bool = True,
                 prepare: Callable[[Transformer], object] | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(max_seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.block_size = block_size
        self.max_blocks_per_seq = blocks_for(self.max_seq_len, block_size)
        self.num_blocks = num_blocks or slots * self.max_blocks_per_seq + 1
        kv_heads = model.layers[0].attention.wk.weight.shape[0] // self.cfg.head_dim
        self.cache = PagedKVCache(model.cfg, self.num_blocks, block_size, dtype=self.dtype, device=self.device,
                                  n_kv_heads=kv_heads)
        self.cache.use_kernel = triton_available(self.device)
        self.lora_layers = attach_multi_lora(model, max_loras, max_lora_rank) if max_loras > 0 else {}
        self.sample_here = sample_on_this_rank
        if prepare is not None:  # e.g. tensor parallelism's all-reduce wrappers, after LoRA, before packing
            prepare(model)
        model.inv_freq = model.inv_freq.to(self.device)  # RoPE tables built on the device, never copied
        if self.device.type == "cuda":
            fuse_projections(model)
            self.compiled = compile_elementwise(self.device, self.dtype)
        else:
            pack_linears(model)
        self.graphs = GraphPool(self, slots) if (self.device.type == "cuda" if cuda_graphs is None
                                                 else cuda_graphs) else None
        self.stats = {"graph_steps": 0, "eager_steps": 0, "capture_s": 0.0}

    # ---- inputs -----------------------------------------------------------------------------------

    def _inputs(self, batch: StepBatch, rows: int | None = None):
        """Host lists -> device tensors [rows, W] (padding rows/columns point at the scratch block)."""
        n = len(batch)
        rows = rows or n
        width = max(len(t) for t in batch.tokens)
        nblk = blocks_for(max(s + width for s in batch.starts), self.block_size)
        pad = [[0] * width] * (rows - n)
        tokens = torch.tensor([t + [0] * (width - len(t)) for t in batch.tokens] + pad)
        positions = torch.tensor([list(range(s, s + width)) for s in batch.starts] + pad)
        tables = torch.tensor([t[:nblk] + [NULL_BLOCK] * (nblk - len(t[:nblk])) for t in batch.tables]
                              + [[NULL_BLOCK] * nblk] * (rows - n))
        loras = torch.tensor(batch.lora_slots + [0] * (rows - n))
        last = torch.tensor([len(t) - 1 for t in batch.tokens] + [0] * (rows - n))
        return tuple(x.to(self.device, non_blocking=True) for x in (tokens, positions, tables, loras, last))

    # ---- the step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepOutput:
        if self.graphs is not None and not batch.verify and all(len(t) == 1 for t in batch.tokens):
            logits = self.graphs.run(batch)
            if logits is not None:
                self.stats["graph_steps"] += 1
                return self._sample(batch, logits)
        self.stats["eager_steps"] += 1
        tokens, positions, tables, loras, last = self._inputs(batch)
        span = max(s + len(t) for s, t in zip(batch.starts, batch.tokens))
        logits = self.forward(tokens, positions, tables, loras, set(batch.lora_slots), span,
                              last_index=None if batch.verify else last)
        if not batch.verify:
            return self._sample(batch, logits)
        first = sample(logits[:, 0], batch.sampling) if self.sample_here else None
        if first is None:
            return StepOutput([], None)
        picks = torch.cat([first[:, None], logits.argmax(-1)], dim=1).tolist()  # one device->host copy
        return StepOutput([p[0] for p in picks], [p[1:] for p in picks])

    @torch.inference_mode()
    def forward(self, tokens, positions, tables, loras, used: set[int], span: int | None,
                last_index: torch.Tensor | None = None, all_active: bool = False) -> torch.Tensor:
        """The model over the cache: logits [B, V] at `last_index` (each row's last token), else [B, T, V]."""
        if self.lora_layers:
            set_rows(self.lora_layers, loras, used, all_active=all_active)
        self.cache.bind(tables, positions, span)
        if last_index is None:
            return self.model(tokens, positions, self.cache)
        return self.model(tokens, positions, self.cache, last_index=last_index)[:, -1]

    def _sample(self, batch: StepBatch, logits: torch.Tensor) -> StepOutput:
        if not self.sample_here:
            return StepOutput([], None)
        return StepOutput(sample(logits[: len(batch)], batch.sampling).tolist())

    def load_adapter(self, slot: int, spec: LoraSpec, state: dict[str, torch.Tensor]) -> None:
        load_into_slot(self.lora_layers, slot, spec, state)
        if self.graphs is not None:
            self.graphs.adapters_changed()

    def load_adapter_shard(self, slot: int, spec: LoraSpec, state: dict[str, torch.Tensor], rank: int,
                           world: int) -> None:
        load_into_slot(self.lora_layers, slot, spec, state, tp_rank=rank, tp_world=world)
        if self.graphs is not None:
            self.graphs.adapters_changed()


class GraphPool:
    """CUDA graphs of the decode step, one per (batch bucket, LoRA rank in use), captured lazily.

    A graph replays a fixed sequence of kernels on fixed buffers, so every step copies its
    inputs into static tensors sized for the largest bucket and reads the logits from a static
    output. Padding rows decode token 0 at position 0 into the scratch block. Graphs with LoRA
    run every adapted layer for every row (adapters a row does not use contribute zeros), so
    one capture serves any mix of adapters; they are recaptured when a larger rank arrives."""

    def __init__(self, runner: LocalRunner, max_rows: int):
        self.runner = runner
        self.max_rows = bucket_for(max_rows) or max_rows
        self.graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self.failed = False
        dev = runner.device
        n = self.max_rows
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, runner.max_blocks_per_seq, dtype=torch.long, device=dev)
        self.loras = torch.zeros(n, dtype=torch.long, device=dev)
        self.pool = None

    def adapters_changed(self) -> None:
        rank = self._rank()
        for key in [k for k in self.graphs if k[1] not in (0, rank)]:
            del self.graphs[key]

    def _rank(self) -> int:
        layers = self.runner.lora_layers
        return next(iter(layers.values())).rows.r_eff if layers else 0

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """Logits [bucket, V] for a decode batch, or None to run it eagerly."""
        bucket = bucket_for(len(batch))
        if self.failed or bucket is None or bucket > self.max_rows or not self.runner.cache.use_kernel:
            return None
        rank = self._rank() if any(batch.lora_slots) else 0
        tokens, positions, tables, loras, _ = self.runner._inputs(batch, rows=bucket)
        self.tokens[:bucket].copy_(tokens)
        self.positions[:bucket].copy_(positions)
        self.tables[:bucket].zero_()
        self.tables[:bucket, : tables.shape[1]].copy_(tables)
        self.loras[:bucket].copy_(loras)
        key = (bucket, rank)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(bucket, rank)
            except Exception:  # noqa: BLE001 - capture is an optimisation: run eagerly from now on
                log.exception("CUDA graph capture failed; decoding eagerly")
                self.failed = True
                return None
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _forward(self, bucket: int, rank: int) -> torch.Tensor:
        used = {1} if rank else set()
        return self.runner.forward(self.tokens[:bucket], self.positions[:bucket], self.tables[:bucket],
                                   self.loras[:bucket], used, None, last_index=None,
                                   all_active=bool(rank))[:, -1]

    def _capture(self, bucket: int, rank: int):
        t0 = time.monotonic()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels chosen and compiled outside the capture
                self._forward(bucket, rank)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(bucket, rank)
        self.pool = graph.pool()
        torch.cuda.synchronize()
        self.runner.stats["capture_s"] += time.monotonic() - t0
        return graph, out
