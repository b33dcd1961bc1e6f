"""Prometheus metrics of one replica: requests, tokens, time to first token, adapters."""

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
        self.resident.set(len(snapshot["resident_adapters"]))
        self.resident_info.clear()
        for name in snapshot["resident_adapters"]:
            self.resident_info.labels(adapter=name).set(1)
        return generate_latest(self.registry)
