"""Which LoRA adapter sits in which slot of the model, loaded off the engine thread.

Fetching an adapter (storage download, checksum, parsing) can take seconds on a slow or
unreachable store, while every running request waits on the engine thread. So the engine only
asks: `acquire` starts a background fetch (one per adapter at a time, however many requests
want it) and says "not yet"; the request keeps waiting while the others decode. Once fetched,
the tensors are copied into a free slot on the engine thread between two steps (milliseconds).
Slots are reused least recently used first, never one that a running request uses.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from llama.lora import LoraSpec

AdapterKey = tuple[str, str]  # (name, version)
AdapterLoader = Callable[[AdapterKey], tuple[LoraSpec, dict[str, torch.Tensor]]]
FAILURE_TTL_S = 1.0  # requests already waiting for a failed fetch get its error; later ones retry


class AdapterSlots:
    def __init__(self, max_loras: int, loader: AdapterLoader, install: Callable[[int, LoraSpec, dict], None],
                 wake: Callable[[], None] = lambda: None):
        self.max_loras = max_loras
        self.loader, self.install, self.wake = loader, install, wake
        self.slot_of: collections.OrderedDict[AdapterKey, int] = collections.OrderedDict()
        self.users: collections.Counter[AdapterKey] = collections.Counter()
        self.fetching: dict[AdapterKey, Future] = {}
        self.failed: dict[AdapterKey, tuple[BaseException, float]] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="herd-adapter")

    def acquire(self, key: AdapterKey) -> int | None:
        """A slot holding `key`, or None while it is being fetched or every slot is busy.
        Raises the fetch's error (a broken or unreachable adapter fails only its requests)."""
        if key in self.slot_of:
            self.slot_of.move_to_end(key)
            self.users[key] += 1
            return self.slot_of[key]
        failure = self.failed.get(key)
        if failure is not None:
            if time.monotonic() - failure[1] < FAILURE_TTL_S:
                raise failure[0]
            del self.failed[key]
        future = self.fetching.get(key)
        if future is None:
            future = self.fetching[key] = self._pool.submit(self.loader, key)
            future.add_done_callback(lambda _: self.wake())
            return None
        if not future.done():
            return None
        slot = self._free_slot()
        if slot is None:
            return None  # fetched, but every slot is in use: wait for one to free up
        del self.fetching[key]
        try:
            spec, state = future.result()
            self.install(slot, spec, state)
        except Exception as e:  # noqa: BLE001 - reported to the requests that wanted it
            self.failed[key] = (e, time.monotonic())
            raise
        self.slot_of[key] = slot
        self.users[key] += 1
        return slot

    def _free_slot(self) -> int | None:
        free = set(range(1, self.max_loras + 1)) - set(self.slot_of.values())
        if free:
            return min(free)
        idle = [k for k in self.slot_of if self.users[k] == 0]
        if not idle:
            return None
        return self.slot_of.pop(idle[0])

    def release(self, key: AdapterKey) -> None:
        self.users[key] -= 1

    def resident(self) -> list[AdapterKey]:
        return list(self.slot_of)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
