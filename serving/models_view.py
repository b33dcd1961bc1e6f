"""What a replica serves: the base model, and adapters resolved through the registry.

`<base>:<adapter>` means the adapter's `current` version; `<base>:<adapter>@vN` pins one.
Resolutions are cached for `ttl_s` seconds, so a promote or rollback reaches every replica
within that time, with no restart; requests already running keep the version they started with.

Storage outages: an adapter resolved before keeps serving its last-resolved version while the
storage does not answer (storage shown as degraded, a warning in the log), and is refreshed in
the background, so a version promoted meanwhile is picked up once the storage answers again. An
adapter that would need the storage to resolve or load gets a 503 `storage_unavailable` at once.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from cluster.names import BadName, split_ref
from cluster.registry import AdapterRegistry, RegistryError
from cluster.storage import NotFound, Storage, StorageError
from llama.lora import LoraSpec
from serving.openai_schema import APIError

logger = logging.getLogger("ray.serve")


def storage_unavailable(model: str) -> APIError:
    return APIError(503, f"{model!r} cannot be loaded: the model storage is unreachable; retry later "
                         "(adapters already in use keep serving)", param="model", code="storage_unavailable")


class ModelsView:
    def __init__(self, storage: Storage, base: str, ttl_s: float = 1.0):
        self.registry = AdapterRegistry(storage)
        self.base = base
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, tuple[str, str]]] = {}
        self._lock = threading.Lock()
        self._degraded_since: float | None = None
        self._refreshing: set[str] = set()

    # ---- storage health -------------------------------------------------------------------------

    def storage_degraded(self) -> bool:
        return self._degraded_since is not None

    def storage_failed(self, e: StorageError) -> None:
        with self._lock:
            first = self._degraded_since is None
            if first:
                self._degraded_since = time.monotonic()
        if first:
            logger.warning("model storage unreachable, serving resident adapters at their last-resolved "
                           "versions: %s", e)

    def _storage_answered(self) -> None:
        with self._lock:
            since, self._degraded_since = self._degraded_since, None
        if since is not None:
            logger.warning("model storage reachable again after %.1f s", time.monotonic() - since)

    def _public(self, e: StorageError) -> str:
        """A registry message without the storage URL (callers need not know where models live)."""
        return str(e).replace(f" in {self.registry.storage.url}", "").replace(self.registry.storage.url, "storage")

    # ---- resolving ------------------------------------------------------------------------------

    def resolve(self, model: str) -> tuple[str, str] | None:
        """`model` field -> None (base) or (adapter, version); APIError 404 for unknown names,
        503 when resolving needs the storage and it does not answer."""
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
        with self._lock:
            hit = self._cache.get(ref)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        if hit and self.storage_degraded():  # don't make the request wait on a storage that is down
            self._refresh_in_background(ref)
            return hit[1]
        try:
            return self._lookup(model, ref)
        except StorageError as e:
            self.storage_failed(e)
            if hit:
                return hit[1]
            raise storage_unavailable(model) from None

    def _lookup(self, model: str, ref: str) -> tuple[str, str]:
        """Ask the registry (StorageError when the storage fails) and cache the answer."""
        try:
            name, version, meta = self.registry.resolve(ref)
        except (RegistryError, NotFound) as e:
            self._storage_answered()
            raise APIError(404, self._public(e), param="model", code="model_not_found") from None
        self._storage_answered()
        if meta["base_model"] != self.base:
            raise APIError(404, f"adapter {name}@{version} is for base model {meta['base_model']!r}, "
                                f"not {self.base!r}", param="model", code="model_not_found")
        with self._lock:
            self._cache[ref] = (time.monotonic(), (name, version))
        return name, version

    def _refresh_in_background(self, ref: str) -> None:
        with self._lock:
            if ref in self._refreshing:
                return
            self._refreshing.add(ref)

        def refresh():
            try:
                self._lookup(f"{self.base}:{ref}", ref)
            except StorageError:
                pass  # still down: keep the last-resolved version
            except APIError:
                with self._lock:  # gone from the registry meanwhile
                    self._cache.pop(ref, None)
            finally:
                with self._lock:
                    self._refreshing.discard(ref)
        threading.Thread(target=refresh, name=f"herd-resolve-{ref}", daemon=True).start()

    # ---- loading --------------------------------------------------------------------------------

    def load(self, key: tuple[str, str]) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
        """Adapter weights for the engine (checksums verified by the registry); fails at once while
        the storage is known to be down (the caller answers 503)."""
        if self.storage_degraded():
            raise StorageError(f"cannot load adapter {key[0]}@{key[1]}: the model storage is unreachable")
        try:
            _, _, _, spec, state = self.registry.load(f"{key[0]}@{key[1]}")
        except (RegistryError, NotFound):
            raise
        except StorageError as e:
            self.storage_failed(e)
            raise
        return spec, state

    def list(self) -> list[dict]:
        rows = [{"id": self.base, "object": "model", "created": 0, "owned_by": "herd"}]
        for adapter in self.registry.list():
            if adapter["base_model"] == self.base:
                rows.append({"id": f"{self.base}:{adapter['name']}", "object": "model", "created": 0,
                             "owned_by": "herd", "parent": self.base, "current_version": adapter["current"],
                             "versions": adapter["versions"]})
        return rows
