"""TP=N replicas: the Serve replica drives N Ray actors, one shard each, step by step.

Inside a Serve replica deployed with `placement_group_bundles` the workers go into bundles
1..N of the replica's own placement group (bundle 0 is the replica). The gloo group (NCCL on
GPU) is formed without port races: rank 0 opens a TCPStore on a free port and shares it.
Every engine forward is one remote call per worker; rank 0 returns the logits.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray
import torch

from cluster.models import load_config, local_model_dir, model_prefix
from cluster.storage import Storage, open_storage
from llama.lora import LoraSpec
from llama.tokenizer import Tokenizer


@ray.remote
class TPWorker:
    def __init__(self, rank: int, world: int, storage_url: str, model: str, slots: int, max_loras: int,
                 max_lora_rank: int, max_seq_len: int | None, threads: int = 1, dtype: str = "auto"):
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        self.args = (storage_url, model, slots, max_loras, max_lora_rank, max_seq_len, dtype)
        self._store = None

    def open_store(self) -> tuple[str, int]:
        """Rank 0: a TCPStore on a free port for the group to meet at."""
        host = ray.util.get_node_ip_address()
        self._store = torch.distributed.TCPStore(host, 0, self.world, is_master=True, wait_for_workers=False)
        return host, self._store.port

    def join(self, host: str, port: int) -> None:
        import torch.distributed as dist
        from llama.model import SlotKVCache
        from llama.multi_lora import attach_multi_lora
        from llama.packed_linear import pack_linears
        from llama.tensor_parallel import load_shard, wrap_row_parallel
        from llama.weights import inference_dtype
        if self._store is None:
            self._store = torch.distributed.TCPStore(host, port, self.world, is_master=False)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=self._store, rank=self.rank, world_size=self.world)
        storage_url, model, slots, max_loras, max_lora_rank, max_seq_len, dtype = self.args
        directory = local_model_dir(open_storage(storage_url), model)
        dtype = inference_dtype(dtype, directory)
        self.model = load_shard(directory, self.rank, self.world, dtype=dtype)
        self.lora_layers = attach_multi_lora(self.model, max_loras, max_lora_rank) if max_loras else {}
        wrap_row_parallel(self.model)
        pack_linears(self.model)
        cfg = self.model.cfg
        self.cache = SlotKVCache(cfg, slots, max_seq_len or cfg.max_seq_len, dtype=dtype,
                                 n_kv_heads=cfg.n_kv_heads // self.world)

    def shard_numel(self) -> int:
        from llama.packed_linear import weight_numel
        return weight_numel(self.model)

    def forward(self, tokens, positions, rows, lora_slots, last_index=None, all_logits=False):
        from serving.runner import slot_forward
        logits = slot_forward(self.model, self.cache, self.lora_layers, tokens, positions, rows, lora_slots,
                              last_index, all_logits)
        return logits if self.rank == 0 else None

    def load_adapter(self, slot: int, spec: LoraSpec, state: dict) -> None:
        from llama.multi_lora import load_into_slot
        load_into_slot(self.lora_layers, slot, spec, state, tp_rank=self.rank, tp_world=self.world)


def _tokenizer(storage: Storage, model: str) -> Tokenizer:
    """Only tokenizer.model, not the weights: the replica itself holds no shard."""
    local = storage.local_path(model_prefix(model))
    if local is not None:
        return Tokenizer(local / "tokenizer.model")
    tmp = Path(tempfile.mkdtemp(prefix="herd-tok-")) / "tokenizer.model"
    storage.download_file(f"{model_prefix(model)}/tokenizer.model", tmp)
    return Tokenizer(tmp)


class TPRunner:
    def __init__(self, workers: list, cfg, max_seq_len: int | None):
        self.workers = workers
        self.cfg = cfg
        self.max_seq_len = max_seq_len or cfg.max_seq_len

    @classmethod
    def create(cls, storage: Storage, model: str, tp: int, slots: int, max_loras: int, max_lora_rank: int,
               max_seq_len: int | None = None, worker_cpus: float = 0.5, dtype: str = "auto"):
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        cfg = load_config(storage, model)
        pg = get_current_placement_group()
        workers = []
        for rank in range(tp):
            options: dict = {"num_cpus": worker_cpus}
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1)
            workers.append(TPWorker.options(**options).remote(rank, tp, storage.url, model, slots, max_loras,
                                                              max_lora_rank, max_seq_len, dtype=dtype))
        host, port = ray.get(workers[0].open_store.remote())
        ray.get([w.join.remote(host, port) for w in workers])
        return cls(workers, cfg, max_seq_len), _tokenizer(storage, model)

    def forward(self, tokens, positions, rows, lora_slots, last_index=None, all_logits=False):
        return ray.get([w.forward.remote(tokens, positions, rows, lora_slots, last_index, all_logits)
                        for w in self.workers])[0]

    def load_adapter(self, slot, spec, state):
        ray.get([w.load_adapter.remote(slot, spec, state) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
