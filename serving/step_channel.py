"""Step inputs to the TP workers through shared memory, not a Ray call per worker per step.

A TP group stays on its replica's node (STRICT_PACK), so the replica can hand every step to its
workers the way vLLM's executor does: it writes the pickled step into a shared-memory buffer (a
file on /dev/shm that every process maps) and
wakes each worker with one byte on its own FIFO; rank 0 writes the step's output (token ids, or
the error) into a second buffer and wakes the replica through another FIFO. A worker blocks in
`read` between steps (no spinning), and a step costs two pipe round trips instead of N Ray calls
(a task submission, a scheduling decision and a reply each).

Rank 0's answer also means every rank has read the step: the forward's all-reduces cannot finish
before each rank joined them with its own copy of the inputs, so the buffer is free to reuse.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import shutil
import struct
import tempfile
import threading
import time
import mmap
from typing import Callable

HEADER = struct.Struct("<QQ")  # step number, payload bytes
STEP_CAPACITY = 16 << 20
RESULT_CAPACITY = 4 << 20


class StepTooLarge(ValueError):
    """A step whose pickled inputs do not fit the buffer: send it the ordinary way."""


class StepChannel:
    """The replica's end: `send` one step to every worker and wait for rank 0's output."""

    def __init__(self, workers: int):
        # tmpfs where there is one: the buffers are memory, never written back to a disk
        self.dir = tempfile.mkdtemp(prefix="herd-tp-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.steps_path, self.results_path = os.path.join(self.dir, "steps"), os.path.join(self.dir, "results")
        self.steps = _map(self.steps_path, STEP_CAPACITY, create=True)
        self.results = _map(self.results_path, RESULT_CAPACITY, create=True)
        self.wake_paths = [os.path.join(self.dir, f"wake{r}") for r in range(workers)]
        self.done_path = os.path.join(self.dir, "done")
        for path in self.wake_paths + [self.done_path]:
            os.mkfifo(path)
        self.done_fd = os.open(self.done_path, os.O_RDONLY | os.O_NONBLOCK)
        self.wake_fds: list[int] = []
        self.seq = 0

    def spec(self) -> dict:
        """What a worker needs to attach (names and paths on this node)."""
        return {"steps": self.steps_path, "results": self.results_path, "wake": self.wake_paths,
                "done": self.done_path}

    def connect(self, timeout_s: float) -> None:
        """Open the wake FIFOs for writing once each worker's loop has opened its own for reading."""
        deadline = time.monotonic() + timeout_s
        for path in self.wake_paths:
            while True:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                    break
                except OSError as e:  # ENXIO: no reader yet
                    if e.errno != errno.ENXIO or time.monotonic() > deadline:
                        raise TimeoutError(f"a TP worker did not attach to {path} within {timeout_s:.0f}s") from e
                    time.sleep(0.01)
            os.set_blocking(fd, True)
            self.wake_fds.append(fd)

    def send(self, step: object, timeout_s: float) -> object:
        payload = pickle.dumps(step, protocol=5)
        if HEADER.size + len(payload) > STEP_CAPACITY:
            raise StepTooLarge(f"{len(payload)} bytes")
        self.seq += 1
        HEADER.pack_into(self.steps, 0, self.seq, len(payload))
        self.steps[HEADER.size:HEADER.size + len(payload)] = payload
        for fd in self.wake_fds:
            os.write(fd, b"s")
        ready, _, _ = select.select([self.done_fd], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"no TP worker answered step {self.seq} within {timeout_s:.0f}s")
        os.read(self.done_fd, 1)
        seq, n = HEADER.unpack_from(self.results, 0)
        if seq != self.seq:
            raise RuntimeError(f"TP rank 0 answered step {seq}, expected {self.seq}")
        out = pickle.loads(self.results[HEADER.size:HEADER.size + n])
        if isinstance(out, BaseException):
            raise out
        return out

    def close(self) -> None:
        """Closing the wake FIFOs ends the workers' loops (they read end-of-file)."""
        for fd in self.wake_fds + [self.done_fd]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.steps.close()
        self.results.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _map(path: str, size: int, create: bool = False) -> mmap.mmap:
    """A file on tmpfs mapped shared: what the replica writes, the workers see."""
    with open(path, "w+b" if create else "r+b") as f:
        if create:
            f.truncate(size)
        return mmap.mmap(f.fileno(), size)


def serve_steps(spec: dict, rank: int, execute: Callable[[object], object], lock: threading.Lock) -> threading.Thread:
    """A worker's loop, in a daemon thread: wait for a step, run it, rank 0 answers. Returns at once;
    the FIFO is opened inside the thread (opening blocks until the replica opens its end)."""

    def loop() -> None:
        steps, results = _map(spec["steps"], STEP_CAPACITY), _map(spec["results"], RESULT_CAPACITY)
        wake = os.open(spec["wake"][rank], os.O_RDONLY)
        done = os.open(spec["done"], os.O_WRONLY) if rank == 0 else None
        try:
            while os.read(wake, 1):
                seq, n = HEADER.unpack_from(steps, 0)
                step = pickle.loads(steps[HEADER.size:HEADER.size + n])
                try:
                    with lock:
                        out = execute(step)
                except Exception as e:  # noqa: BLE001 - the replica raises it
                    out = RuntimeError(f"TP rank {rank}: {type(e).__name__}: {e}")
                if done is None:
                    continue
                payload = pickle.dumps(out, protocol=5)
                if HEADER.size + len(payload) > RESULT_CAPACITY:
                    payload = pickle.dumps(RuntimeError(f"step output of {len(payload)} bytes is too large"))
                results[HEADER.size:HEADER.size + len(payload)] = payload
                HEADER.pack_into(results, 0, seq, len(payload))
                os.write(done, b"d")
        finally:
            os.close(wake)
            if done is not None:
                os.close(done)
            steps.close()
            results.close()

    thread = threading.Thread(target=loop, name=f"herd-tp-steps-{rank}", daemon=True)
    thread.start()
    return thread
