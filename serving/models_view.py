"""What a replica serves: the base model, and adapters resolved through the registry.

`<base>:<adapter>` means the adapter's `current` version; `<base>:<adapter>@vN` pins one.
Resolutions are cached for `ttl_s` seconds, so a promote or rollback reaches every replica
within that time, with no restart; requests already running keep the version they started with.
"""

from __future__ import annotations

import threading
import time

import torch

from cluster.names import BadName, split_ref
from cluster.registry import AdapterRegistry, RegistryError
from cluster.storage import Storage
from llama.lora import LoraSpec
from serving.openai_schema import APIError


class ModelsView:
    def __init__(self, storage: Storage, base: str, ttl_s: float = 1.0):
        self.registry = AdapterRegistry(storage)
        self.base = base
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, tuple[str, str]]] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> tuple[str, str] | None:
        """`model` field -> None (base) or (adapter, version); APIError 404 for unknown names."""
        base, sep, ref = model.partition(":")
        if base != self.base:
            raise APIError(404, f"model {base!r} is not served here; this endpoint serves {self.base!r}",
                           param="model", code="model_not_found")
        if not sep:
            return None
        try:
            split_ref(ref)
        except BadName as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(ref)
            if hit and now - hit[0] < self.ttl_s:
                return hit[1]
        try:
            name, version, meta = self.registry.resolve(ref)
        except RegistryError as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        if meta["base_model"] != self.base:
            raise APIError(404, f"adapter {name}@{version} is for base model {meta['base_model']!r}, "
                                f"not {self.base!r}", param="model", code="model_not_found")
        with self._lock:
            self._cache[ref] = (now, (name, version))
        return name, version

    def load(self, key: tuple[str, str]) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
        """Adapter weights for the engine (checksums verified by the registry)."""
        _, _, _, spec, state = self.registry.load(f"{key[0]}@{key[1]}")
        return spec, state

    def list(self) -> list[dict]:
        rows = [{"id": self.base, "object": "model", "created": 0, "owned_by": "herd"}]
        for adapter in self.registry.list():
            if adapter["base_model"] == self.base:
                rows.append({"id": f"{self.base}:{adapter['name']}", "object": "model", "created": 0,
                             "owned_by": "herd", "parent": self.base, "current_version": adapter["current"],
                             "versions": adapter["versions"]})
        return rows
