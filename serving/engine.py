"""The continuous-batching engine: the loop that ties scheduler, runner and detokenizer together.

One thread owns the model. At every step it asks the scheduler what to run (serving/scheduler.py:
admission, KV blocks, chunked prefill, preemption), runs it on the runner (serving/runner.py:
device inputs, CUDA graphs, sampling on the device), and turns the sampled ids into text
(serving/detokenizer.py), streamed to each request's callback. Requests for different LoRA
adapters share the batch; adapters are fetched off this thread (serving/adapters.py).

Callers (the HTTP layer) `submit` a request with an `emit` callback and may `cancel` it; the
callback receives `TokenEvent`s and one `FinishEvent` (or `ErrorEvent`). `health()` says when
the runner keeps failing, so the deployment's health check can have the replica replaced.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time

import torch

from llama.tokenizer import Tokenizer
from serving.adapters import AdapterLoader, AdapterSlots
from serving.detokenizer import IncrementalDetokenizer
from serving.kv_blocks import BlockPool
from serving.request import ErrorEvent, FinishEvent, Request, TokenEvent  # noqa: F401 (re-exported)
from serving.runner import Runner, StepOutput
from serving.scheduler import Plan, Scheduler

log = logging.getLogger("herd.engine")

FAILURES_BEFORE_UNHEALTHY = 3  # consecutive failed steps


class Engine:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, slots: int, max_loras: int = 0,
                 adapter_loader: AdapterLoader | None = None, max_waiting: int = 256,
                 max_prefills_per_step: int = 16, stream_interval: int = 1, speculate_tokens: int = 8,
                 speculate_max_batch: int = 4, prefill_batch: int = 4, prefill_wait_s: float = 0.05,
                 threads: int | None = None, stream_interval_ms: float = 0.0, prefill_chunk: int = 512):
        self.runner, self.tok = runner, tokenizer
        self.threads = threads
        self.cfg = runner.cfg
        self.max_seq_len = runner.max_seq_len
        self.slots = slots
        self.pool = BlockPool(runner.num_blocks, runner.block_size)
        self.adapters = AdapterSlots(max_loras, adapter_loader, runner.load_adapter, self._wake) if max_loras else None
        self.scheduler = Scheduler(self.pool, slots, self.max_seq_len, self.adapters, prefill_chunk=prefill_chunk,
                                   prefill_batch=prefill_batch, prefill_wait_s=prefill_wait_s,
                                   max_prefills_per_step=max_prefills_per_step,
                                   speculate_tokens=speculate_tokens, speculate_max_batch=speculate_max_batch)
        self.max_waiting = max_waiting
        self.stream_interval = stream_interval  # send text every N tokens (vLLM's --stream-interval)
        # ... and at most every this many ms per request: each chunk costs the HTTP stack far more
        # than a token costs the model, and a reader sees no difference below ~50 ms.
        self.stream_interval_s = stream_interval_ms / 1000
        self._cv = threading.Condition()
        self._stop = False
        self.stats = collections.Counter()
        self.ttft: collections.deque[float] = collections.deque(maxlen=1000)
        self.itl: collections.deque[float] = collections.deque(maxlen=1000)
        self.failures = 0  # consecutive failed steps
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
        self._thread.start()

    # ---- API (any thread) -------------------------------------------------------------------

    class Overloaded(RuntimeError):
        pass

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.active

    def submit(self, req: Request) -> Request:
        if len(req.prompt_ids) + 1 > self.max_seq_len:
            raise ValueError(f"prompt has {len(req.prompt_ids)} tokens; the context window is {self.max_seq_len}")
        if req.adapter is not None and self.adapters is None:
            raise ValueError("this server was deployed without LoRA slots (--max-loras 0)")
        seed = req.params.seed
        req.seed = (seed if seed is not None else random.getrandbits(63)) % (1 << 63)
        req.detok = IncrementalDetokenizer(self.tok, req.stop_strings)
        with self._cv:
            if len(self.scheduler.waiting) >= self.max_waiting:
                raise Engine.Overloaded(f"{len(self.scheduler.waiting)} requests are already waiting")
            self.scheduler.waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            active = len(self.scheduler.active)
            return {"running": active, "waiting": len(self.scheduler.waiting),
                    "free_slots": self.slots - active,
                    "kv_blocks_used": self.pool.used, "kv_blocks_free": self.pool.free,
                    "preemptions": self.scheduler.stats["preemptions"],
                    "resident_adapters": [f"{n}@{v}" for n, v in self.adapters.resident()] if self.adapters else []}

    def health(self) -> str | None:
        """None while steps succeed; the reason once FAILURES_BEFORE_UNHEALTHY steps in a row failed."""
        if self.failures >= FAILURES_BEFORE_UNHEALTHY:
            return f"the model runner failed {self.failures} steps in a row: {self.last_error}"
        if not self._thread.is_alive() and not self._stop:
            return "the engine thread has stopped"
        return None

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        if self.adapters:
            self.adapters.shutdown()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the loop (engine thread) -------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            # The model runs on this thread, so this is the OpenMP team to size. The thread that built
            # the engine should have run torch single-threaded: a second, idle OpenMP pool in the
            # process makes libgomp throttle its spin-waits (more threads than cores), which made
            # every decode step here about 1.7x slower (bench/serve.py, 2 cores).
            torch.set_num_threads(self.threads)
        sched = self.scheduler
        while True:
            plan = Plan()
            try:
                with self._cv:
                    while not self._stop and not sched.waiting and not sched.active:
                        self._cv.wait()
                    if self._stop:
                        return
                    for req in [r for r in sched.waiting if r.cancelled]:
                        sched.waiting.remove(req)
                        self._finish(req, "cancelled")
                    for req in [r for r in sched.active if r.cancelled]:
                        self._finish(req, "cancelled")
                    plan = sched.schedule()
                for req, error in plan.rejected:
                    self._fail(req, error)
                if not plan:
                    with self._cv:  # only waiting: on an adapter fetch, blocks or rows
                        self._cv.wait(timeout=0.005)
                    continue
                self._step(plan)
                self.failures = 0
            except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving, tell health()
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("engine step failed (%d in a row)", self.failures)
                for req in [r for r, _ in plan.prefill] + plan.decode:
                    self._finish(req, None, error=f"engine error: {self.last_error}")

    def _fail(self, req: Request, error: BaseException) -> None:
        name, version = req.adapter
        status = getattr(error, "status", 503)
        code = getattr(error, "code", "adapter_unavailable")
        self._finish(req, None, error=f"cannot load adapter {name}@{version}: {error}", status=status, code=code)

    def _step(self, plan: Plan) -> None:
        sched = self.scheduler
        if plan.prefill:
            out = self.runner.execute(sched.prefill_batch_of(plan))
            for i, (req, n) in enumerate(plan.prefill):
                self.stats["prompt_tokens"] += n
                if sched.prefilled(req, n) and not req.cancelled:
                    self._accept(req, out.sampled[i])
        if plan.decode:
            batch = sched.decode_batch_of(plan)
            self.stats["decode_steps"] += 1
            self.stats["decode_rows"] += len(batch)
            out = self.runner.execute(batch)
            if batch.verify:
                self._verify(plan, out)
                return
            for req, token in zip(plan.decode, out.sampled):
                req.computed += 1
                self._accept(req, token)

    def _verify(self, plan: Plan, out: StepOutput) -> None:
        """Greedy verification: keep drafted tokens while they are what the model picks anyway, so
        the output is exactly what one-token-at-a-time decoding gives."""
        for i, (req, draft) in enumerate(zip(plan.decode, plan.drafts)):
            accepted = [out.sampled[i]]
            for j, token in enumerate(draft):
                if token != accepted[-1]:
                    break
                accepted.append(out.picks[i][j + 1])
            self.stats["draft_tokens"] += len(draft)
            self.stats["draft_accepted"] += len(accepted) - 1
            req.computed += len(accepted)  # the last input token and the drafts that matched
            for j, token in enumerate(accepted):
                if req.done:
                    break
                # tokens verified in one step reach the client as one chunk
                self._accept(req, token, end_of_step=j == len(accepted) - 1)

    def _accept(self, req: Request, token: int, end_of_step: bool = True) -> None:
        """Append a sampled token, stream the new text, finish on EOS/stop/length."""
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            self.ttft.append(now - req.submitted)
        elif end_of_step:
            self.itl.append(now - req.last_token_at)
        req.last_token_at = now
        if (token == self.tok.eos_id and not req.params.ignore_eos) or token in req.params.stop_ids:
            self._finish(req, "stop")
            return
        req.generated.append(token)
        req.unflushed += 1
        self.stats["completion_tokens"] += 1
        req.detok.add(token)
        if req.detok.stopped:
            self._finish(req, "stop")
            return
        if len(req.generated) >= req.params.max_tokens or req.num_tokens >= self.max_seq_len:
            self._finish(req, "length")
            return
        if (end_of_step and req.unflushed >= self.stream_interval
                and now - req.flushed_at >= self.stream_interval_s):
            self._flush(req, token)

    def _flush(self, req: Request, token: int, final: bool = False) -> None:
        req.unflushed = 0
        req.flushed_at = time.monotonic()
        delta = req.detok.take(final)
        if delta:
            req.emit(TokenEvent(delta, token))

    def _finish(self, req: Request, reason: str | None, error: str | None = None, status: int = 500,
                code: str = "engine_error") -> None:
        if req.done:
            return
        req.done = True
        self.scheduler.release(req)
        if req.adapter is not None and req.lora_slot:
            self.adapters.release(req.adapter)
            req.lora_slot = 0
        if error is not None:
            req.emit(ErrorEvent(error, status=status, code=code))
            return
        req.detok.finish()
        self._flush(req, req.generated[-1] if req.generated else -1, final=True)
        self.stats[f"finished_{reason}"] += 1
        req.emit(FinishEvent(reason, len(req.prompt_ids), len(req.generated), list(req.generated), req.text))
