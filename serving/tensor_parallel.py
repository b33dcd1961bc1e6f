"""TP=N replicas: the Serve replica drives N Ray actors, one model shard each, step by step.

Inside a Serve replica deployed with `placement_group_bundles` the workers go into bundles
1..N of the replica's own placement group (bundle 0 is the replica). The process group (NCCL on
GPUs, gloo on CPU) is formed without port races: rank 0 opens a TCPStore on a free port and
shares it. Every rank runs the same `LocalRunner` over its shard and its share of the paged KV
cache (the same block ids everywhere: the replica's scheduler plans one pool, sized by the
rank with the least room); rank 0 samples on its device, so only token ids travel back, never
logits. A worker that does not answer within `step_timeout_s` fails the step (and, repeated,
the replica's health check) instead of hanging it.

Steps reach the workers through shared memory (serving/step_channel.py, as vLLM's executor
broadcasts them) when the group is on the replica's node, which STRICT_PACK makes the rule;
otherwise, or for a step too large for the buffer, as one Ray call per worker.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import ray
import torch

from cluster.models import load_config, local_model_dir, model_prefix
from cluster.placement import dist_backend, torch_device, tp_worker_options
from cluster.storage import Storage, open_storage
from llama.lora import LoraSpec
from llama.tokenizer import Tokenizer
from serving.runner import StepBatch, StepOutput

log = logging.getLogger("herd.tp")
DEFAULT_STEP_TIMEOUT_S = 120.0  # above a first step's warm-up on a loaded machine


@ray.remote
class TPWorker:
    def __init__(self, rank: int, world: int, storage_url: str, model: str, slots: int, max_loras: int,
                 max_lora_rank: int, max_seq_len: int | None, threads: int = 1, dtype: str = "auto",
                 device: str = "cpu"):
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        self.args = (storage_url, model, slots, max_loras, max_lora_rank, max_seq_len, dtype)
        self._store = None
        self._lock = threading.Lock()  # one step or adapter load at a time (Ray calls and the channel)
        self.device = torch.device(torch_device(device))

    def open_store(self) -> tuple[str, int]:
        """Rank 0: a TCPStore on a free port for the group to meet at."""
        host = ray.util.get_node_ip_address()
        self._store = torch.distributed.TCPStore(host, 0, self.world, is_master=True, wait_for_workers=False)
        return host, self._store.port

    def join(self, host: str, port: int, kv_cache_gib: float | None = None,
             gpu_memory_utilization: float = 0.9) -> int:
        """Load this rank's shard; return how many KV blocks its device has room for."""
        import torch.distributed as dist
        from llama.tensor_parallel import load_shard
        from llama.weights import inference_dtype
        from serving.kv_blocks import plan_num_blocks
        if self._store is None:
            self._store = torch.distributed.TCPStore(host, port, self.world, is_master=False)
        dist.init_process_group(dist_backend(self.device.type), store=self._store, rank=self.rank,
                                world_size=self.world)
        storage_url, model, slots, _, _, max_seq_len, dtype = self.args
        directory = local_model_dir(open_storage(storage_url), model)
        self.dtype = inference_dtype(dtype, directory, self.device)
        self.model = load_shard(directory, self.rank, self.world, dtype=self.dtype, device=self.device)
        cfg = self.model.cfg
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        return plan_num_blocks(cfg, self.dtype, self.device, 16, slots, self.max_seq_len, kv_cache_gib,
                               gpu_memory_utilization, n_kv_heads=cfg.n_kv_heads // self.world)

    def allocate(self, num_blocks: int) -> None:
        """The KV pool (the same size on every rank) and the runner over the shard."""
        from llama.tensor_parallel import wrap_row_parallel
        from serving.runner import LocalRunner
        _, _, slots, max_loras, max_lora_rank, _, _ = self.args
        self.runner = LocalRunner(self.model, slots, max_loras, max_lora_rank, self.max_seq_len,
                                  num_blocks=num_blocks, cuda_graphs=False, sample_on_this_rank=self.rank == 0,
                                  prepare=wrap_row_parallel)

    def shard_numel(self) -> int:
        from llama.packed_linear import weight_numel
        return weight_numel(self.model)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def start_steps(self, spec: dict) -> None:
        """Serve steps from the replica's shared-memory channel, in a thread of this actor."""
        from serving.step_channel import serve_steps
        serve_steps(spec, self.rank, self.runner.execute, self._lock)

    def execute(self, batch: StepBatch) -> StepOutput | None:
        with self._lock:
            out = self.runner.execute(batch)
        return out if self.rank == 0 else None

    def load_adapter(self, slot: int, spec: LoraSpec, state: dict) -> None:
        with self._lock:
            self.runner.load_adapter_shard(slot, spec, state, self.rank, self.world)


def _tokenizer(storage: Storage, model: str) -> Tokenizer:
    """Only tokenizer.model, not the weights: the replica itself holds no shard."""
    local = storage.local_path(model_prefix(model))
    if local is not None:
        return Tokenizer(local / "tokenizer.model")
    tmp = Path(tempfile.mkdtemp(prefix="herd-tok-")) / "tokenizer.model"
    storage.download_file(f"{model_prefix(model)}/tokenizer.model", tmp)
    return Tokenizer(tmp)


class TPRunner:
    block_size = 16

    def __init__(self, workers: list, cfg, max_seq_len: int, num_blocks: int,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self.workers = workers
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.num_blocks = num_blocks
        self.step_timeout_s = step_timeout_s
        self.channel = self._open_channel()

    def _open_channel(self):
        """Shared memory to workers on this node; None (Ray calls) when any is elsewhere or it fails."""
        from serving.step_channel import StepChannel
        here = ray.get_runtime_context().get_node_id()
        if any(node != here for node in ray.get([w.node_id.remote() for w in self.workers])):
            return None
        channel = StepChannel(len(self.workers))
        try:
            ray.get([w.start_steps.remote(channel.spec()) for w in self.workers], timeout=self.step_timeout_s)
            channel.connect(self.step_timeout_s)
        except Exception:  # noqa: BLE001 - fall back to Ray calls
            log.exception("shared-memory step channel unavailable; TP steps go by Ray call")
            channel.close()
            return None
        return channel

    @classmethod
    def create(cls, storage: Storage, model: str, tp: int, slots: int, max_loras: int, max_lora_rank: int,
               max_seq_len: int | None = None, worker_cpus: float = 0.5, dtype: str = "auto",
               kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.9,
               step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S, device: str = "cpu",
               setup_timeout_s: float | None = None):
        """Start the group; a worker that cannot be placed or load its shard within `setup_timeout_s`
        fails the replica (Serve retries it) instead of leaving it waiting forever."""
        from ray.util.placement_group import get_current_placement_group
        cfg = load_config(storage, model)
        pg = get_current_placement_group()
        workers = [TPWorker.options(**tp_worker_options(device, worker_cpus, pg, rank)).remote(
            rank, tp, storage.url, model, slots, max_loras, max_lora_rank, max_seq_len, dtype=dtype, device=device)
            for rank in range(tp)]
        timeout = setup_timeout_s or 600.0
        try:
            host, port = ray.get(workers[0].open_store.remote(), timeout=timeout)
            blocks = ray.get([w.join.remote(host, port, kv_cache_gib, gpu_memory_utilization) for w in workers],
                             timeout=timeout)
            num_blocks = min(blocks)
            ray.get([w.allocate.remote(num_blocks) for w in workers], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            for w in workers:
                ray.kill(w)
            raise TimeoutError(f"TP={tp} workers were not placed and loaded within {timeout:.0f}s "
                               "(tp_setup_timeout_s); check the cluster's free CPUs/GPUs") from None
        length = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        return cls(workers, cfg, length, num_blocks, step_timeout_s), _tokenizer(storage, model)

    def execute(self, batch: StepBatch) -> StepOutput:
        from serving.step_channel import StepTooLarge
        if self.channel is not None:
            try:
                return self.channel.send(batch, self.step_timeout_s)
            except StepTooLarge:
                pass
        return ray.get([w.execute.remote(batch) for w in self.workers], timeout=self.step_timeout_s)[0]

    def load_adapter(self, slot, spec, state):
        ray.get([w.load_adapter.remote(slot, spec, state) for w in self.workers], timeout=self.step_timeout_s)

    def shutdown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for w in self.workers:
            ray.kill(w)
