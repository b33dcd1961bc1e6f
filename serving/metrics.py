"""Prometheus metrics of one replica: requests, tokens, latencies, KV blocks, adapters, GPU memory."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("herd_requests", "Requests by endpoint, model, adapter and HTTP status",
                                ["endpoint", "adapter", "status"], registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("herd_completion_tokens", "Tokens generated", registry=r)
        self.disconnects = Counter("herd_client_disconnects", "Requests whose client left before the end "
                                   "(their slot is freed at once)", registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.itl = Histogram("herd_inter_token_latency_seconds", "Mean time between a request's tokens",
                             buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.kv_used = Gauge("herd_kv_blocks_used", "KV-cache blocks held by requests", registry=r)
        self.kv_free = Gauge("herd_kv_blocks_free", "KV-cache blocks free", registry=r)
        self.preemptions = Gauge("herd_preemptions", "Requests preempted (blocks ran out) since start", registry=r)
        self.gpu_memory = Gauge("herd_gpu_memory_bytes", "GPU memory of this replica's process",
                                ["kind"], registry=r)
        self.running = Gauge("herd_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("herd_waiting_requests", "Requests waiting for a slot", registry=r)
        self.resident = Gauge("herd_resident_adapters", "LoRA adapters resident in this replica", registry=r)
        self.storage_degraded = Gauge("herd_storage_degraded", "1 while the model storage does not answer "
                                      "(resident adapters keep serving)", registry=r)
        self.resident_info = Gauge("herd_adapter_resident", "1 for each resident adapter version",
                                   ["adapter"], registry=r)

    def render(self, snapshot: dict, storage_degraded: bool = False) -> bytes:
        self.storage_degraded.set(int(storage_degraded))
        self.running.set(snapshot["running"])
        self.waiting.set(snapshot["waiting"])
        self.kv_used.set(snapshot.get("kv_blocks_used", 0))
        self.kv_free.set(snapshot.get("kv_blocks_free", 0))
        self.preemptions.set(snapshot.get("preemptions", 0))
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())
        self.resident.set(len(snapshot.get("resident_adapters", [])))
        self.resident_info.clear()
        for name in snapshot.get("resident_adapters", []):
            self.resident_info.labels(adapter=name).set(1)
        return generate_latest(self.registry)
