"""The continuous-batching engine.

One thread owns the model. At every step it admits waiting requests into free KV-cache slots
(prefilling their prompts), runs one batched decode forward for every running request, samples
each row with its own parameters, streams the new text, and retires finished or cancelled
requests so their slots are reused by the next step. Requests for different LoRA adapters share
the batch; the adapters live in a fixed number of slots, least recently used evicted (never one
a running request uses).

Callers (the HTTP layer) `submit` a request with an `emit` callback and may `cancel` it; the
callback receives `TokenEvent`s and one `FinishEvent` (or `ErrorEvent`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llama.generation import SamplingParams, sample_next
from llama.lora import LoraSpec
from llama.tokenizer import Tokenizer
from serving.runner import Runner

AdapterKey = tuple[str, str]  # (name, version)
AdapterLoader = Callable[[AdapterKey], tuple[LoraSpec, dict[str, torch.Tensor]]]


@dataclass
class TokenEvent:
    text: str
    token_id: int


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    text: str


@dataclass
class ErrorEvent:
    message: str


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    stop_strings: tuple[str, ...] = ()
    adapter: AdapterKey | None = None
    id: int = field(default_factory=itertools.count().__next__)
    # engine state
    slot: int = -1
    lora_slot: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    cancelled: bool = False
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    done: bool = False
    decoded: int = 0  # len(generated) when `text` was last decoded
    unflushed: int = 0  # tokens accepted since text was last sent
    flushed_at: float = 0.0  # monotonic time text was last sent


class AdapterSlots:
    """Which adapter sits in which LoRA slot; LRU eviction of adapters no running request uses."""

    def __init__(self, max_loras: int, loader: AdapterLoader, runner: Runner):
        self.max_loras = max_loras
        self.loader, self.runner = loader, runner
        self.slot_of: collections.OrderedDict[AdapterKey, int] = collections.OrderedDict()
        self.users: collections.Counter[AdapterKey] = collections.Counter()

    def acquire(self, key: AdapterKey) -> int | None:
        """A slot holding `key` (loading it, evicting the LRU idle adapter), or None if all are busy."""
        if key in self.slot_of:
            self.slot_of.move_to_end(key)
        else:
            free = set(range(1, self.max_loras + 1)) - set(self.slot_of.values())
            if not free:
                idle = [k for k in self.slot_of if self.users[k] == 0]
                if not idle:
                    return None
                free = {self.slot_of.pop(idle[0])}
            slot = min(free)
            spec, state = self.loader(key)
            self.runner.load_adapter(slot, spec, state)
            self.slot_of[key] = slot
        self.users[key] += 1
        return self.slot_of[key]

    def release(self, key: AdapterKey) -> None:
        self.users[key] -= 1

    def resident(self) -> list[AdapterKey]:
        return list(self.slot_of)


class Engine:
    def __init__(self, runner: Runner, tokenizer: Tokenizer, slots: int, max_loras: int = 0,
                 adapter_loader: AdapterLoader | None = None, max_waiting: int = 256,
                 max_prefills_per_step: int = 16, stream_interval: int = 1, speculate_tokens: int = 8,
                 speculate_max_batch: int = 4, prefill_batch: int = 4, prefill_wait_s: float = 0.05,
                 threads: int | None = None, stream_interval_ms: float = 0.0):
        self.runner, self.tok = runner, tokenizer
        self.threads = threads
        self.cfg = runner.cfg
        self.max_seq_len = runner.max_seq_len
        self.slots = slots
        self.free_slots = list(range(slots))
        self.adapters = AdapterSlots(max_loras, adapter_loader, runner) if max_loras else None
        self.max_waiting = max_waiting
        self.max_prefills = max_prefills_per_step
        self.prefill_batch, self.prefill_wait_s = prefill_batch, prefill_wait_s
        self.stream_interval = stream_interval  # send text every N tokens (vLLM's --stream-interval)
        # ... and at most every this many ms per request: each chunk costs the HTTP stack far more
        # than a token costs the model, and a reader sees no difference below ~50 ms.
        self.stream_interval_s = stream_interval_ms / 1000
        # Prompt-lookup speculation for greedy requests while the batch is small (memory-bound decode:
        # checking k guessed tokens costs about one forward). 0 turns it off.
        self.speculate_tokens = speculate_tokens
        self.speculate_max_batch = speculate_max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self.stats = collections.Counter()
        self.ttft: list[float] = []
        self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
        self._thread.start()

    # ---- API (any thread) -------------------------------------------------------------------

    class Overloaded(RuntimeError):
        pass

    def submit(self, req: Request) -> Request:
        if len(req.prompt_ids) + 1 > self.max_seq_len:
            raise ValueError(f"prompt has {len(req.prompt_ids)} tokens; the context window is {self.max_seq_len}")
        if req.adapter is not None and self.adapters is None:
            raise ValueError("this server was deployed without LoRA slots (--max-loras 0)")
        if req.params.temperature > 0:
            req.generator = torch.Generator()
            req.generator.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise Engine.Overloaded(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "free_slots": len(self.free_slots),
                    "resident_adapters": [f"{n}@{v}" for n, v in self.adapters.resident()] if self.adapters else []}

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- the loop (engine thread) -------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            # The model runs on this thread, so this is the OpenMP team to size. The thread that built
            # the engine should have run torch single-threaded: a second, idle OpenMP pool in the
            # process makes libgomp throttle its spin-waits (more threads than cores), which made
            # every decode step here about 1.7x slower (bench/serve.py, 2 cores).
            torch.set_num_threads(self.threads)
        while True:
            admitted: list[Request] = []
            try:
                with self._cv:
                    while not self._stop and not self.waiting and not self.running:
                        self._cv.wait()
                    if self._stop:
                        return
                    admitted = self._admit()
                if not admitted and self.waiting and not self.running:
                    time.sleep(0.001)  # waiting only on LoRA slots held by finishing requests
                self._step(admitted)
                self.stats["consecutive_failures"] = 0
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                self.stats["consecutive_failures"] += 1  # read by the replica's check_health
                for req in admitted + self.running:
                    self._finish(req, None, error=f"engine error: {type(e).__name__}: {e}")

    def _admit(self) -> list[Request]:
        """Move waiting requests into free slots (called with the lock held).

        Decode is memory-bound, so a prefill pass costs about the same for one prompt as for
        several: while others are decoding, a lone new request waits up to `prefill_wait_s` for
        company before its prefill pass.
        """
        admitted: list[Request] = []
        skipped: list[Request] = []
        if (self.running and self.waiting and len(self.waiting) < self.prefill_batch
                and time.monotonic() - self.waiting[0].submitted < self.prefill_wait_s):
            return admitted
        while self.waiting and self.free_slots and len(admitted) < self.max_prefills:
            req = self.waiting.popleft()
            if req.cancelled:
                req.emit(FinishEvent("cancelled", len(req.prompt_ids), 0, [], ""))
                continue
            if req.adapter is not None:
                try:
                    lora = self.adapters.acquire(req.adapter)
                except Exception as e:  # noqa: BLE001 - a broken adapter fails only its request
                    req.emit(ErrorEvent(f"cannot load adapter {req.adapter[0]}@{req.adapter[1]}: {e}"))
                    continue
                if lora is None:  # every LoRA slot is in use: wait for one to free up
                    skipped.append(req)
                    continue
                req.lora_slot = lora
            req.slot = self.free_slots.pop()
            admitted.append(req)
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def _step(self, admitted: list[Request]) -> None:
        if admitted:  # one right-padded forward prefills every new prompt; then they join the batch
            width = max(len(r.prompt_ids) for r in admitted)
            tokens = torch.zeros(len(admitted), width, dtype=torch.long)
            for i, r in enumerate(admitted):
                tokens[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            positions = torch.arange(width).expand(len(admitted), width)
            last = torch.tensor([len(r.prompt_ids) - 1 for r in admitted])
            logits = self.runner.forward(tokens, positions, torch.tensor([r.slot for r in admitted]),
                                         torch.tensor([r.lora_slot for r in admitted]), last_index=last)
            for req, token in zip(admitted, self._sample(admitted, logits)):
                self.stats["prompt_tokens"] += len(req.prompt_ids)
                self._accept(req, token)
                if not req.cancelled and req.slot >= 0:
                    self.running.append(req)
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")
        batch = [r for r in self.running if r not in admitted]
        if not batch:
            return
        drafts = [self._draft(r) for r in batch] if len(batch) <= self.speculate_max_batch else [[] for _ in batch]
        starts = [len(r.prompt_ids) + len(r.generated) - 1 for r in batch]
        # A speculative forward is always full width: on CPU a 2-4 token forward costs more than a
        # 5-8 token one (small-M GEMM kernels), and the padding is never accepted.
        width = 1 + (self.speculate_tokens if any(drafts) else 0)
        width = max(1, min(width, min(self.max_seq_len - p for p in starts)))
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (r, d) in enumerate(zip(batch, drafts)):
            row = [r.generated[-1]] + d[: width - 1]
            tokens[i, : len(row)] = torch.tensor(row)
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None]
        rows = torch.tensor([r.slot for r in batch])
        loras = torch.tensor([r.lora_slot for r in batch])
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(batch)
        if width == 1:
            logits = self.runner.forward(tokens, positions, rows, loras)
            for req, token in zip(batch, self._sample(batch, logits)):
                self._accept(req, token)
            return
        logits = self.runner.forward(tokens, positions, rows, loras, all_logits=True)
        first = self._sample(batch, logits[:, 0])
        for i, (req, draft) in enumerate(zip(batch, drafts)):
            # Greedy verification: keep drafted tokens while they are what the model picks anyway,
            # so the output is exactly what one-token-at-a-time decoding gives.
            picks = logits[i].argmax(-1).tolist()
            accepted = [first[i]]
            for j, token in enumerate(draft[: width - 1]):
                if token != accepted[-1]:
                    break
                accepted.append(picks[j + 1])
            self.stats["draft_tokens"] += len(draft[: width - 1])
            self.stats["draft_accepted"] += len(accepted) - 1
            for j, token in enumerate(accepted):
                if req.done:
                    break
                # tokens verified in one step reach the client as one chunk
                self._accept(req, token, end_of_step=j == len(accepted) - 1)

    def _draft(self, req: Request, n: int = 3) -> list[int]:
        """Prompt-lookup drafting for greedy rows: if the last n tokens occurred before, propose what
        followed them then. Costs no model; a wrong guess costs only a wider forward.

        A match p tokens back means "the text repeats with period p": the continuation is read
        cyclically, so a match that overlaps the tail (a repeated word, a loop) still drafts
        `speculate_tokens` tokens instead of the few that follow it so far."""
        if req.params.temperature != 0 or not self.speculate_tokens:
            return []
        history = req.prompt_ids + req.generated
        for size in range(n, 0, -1):
            if len(history) <= size:
                continue
            tail = history[-size:]
            for start in range(len(history) - size - 1, -1, -1):
                if history[start:start + size] == tail:
                    period = len(history) - size - start
                    return [history[-period + j % period] for j in range(self.speculate_tokens)]
        return []

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(dim=-1)
        out = []
        for i, req in enumerate(batch):
            p = req.params
            if p.temperature == 0:
                out.append(int(greedy[i]))
            else:
                out.append(int(sample_next(logits[i:i + 1], p.temperature, p.top_p, p.top_k, req.generator)[0]))
        return out

    def _accept(self, req: Request, token: int, end_of_step: bool = True) -> None:
        """Append a sampled token, stream the new text, finish on EOS/stop/length."""
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.ttft.append(req.first_token_at - req.submitted)
            self.ttft = self.ttft[-1000:]
        if token == self.tok.eos_id or token in req.params.stop_ids:
            self._finish(req, "stop")
            return
        req.generated.append(token)
        req.unflushed += 1
        self.stats["completion_tokens"] += 1
        last = len(req.generated) >= req.params.max_tokens or \
            len(req.prompt_ids) + len(req.generated) >= self.max_seq_len
        flush_now = (end_of_step and req.unflushed >= self.stream_interval
                     and time.monotonic() - req.flushed_at >= self.stream_interval_s)
        if req.stop_strings or flush_now or last:  # detokenize only when the text is needed
            self._decode(req)
        stop_at = min((i for i in (req.text.find(s) for s in req.stop_strings) if i >= 0), default=-1)
        if stop_at >= 0:
            req.text = req.text[:stop_at]
            self._flush(req, token, hold=0)
            self._finish(req, "stop")
            return
        if flush_now:
            self._flush(req, token, hold=max((len(s) - 1 for s in req.stop_strings), default=0))
        if last:
            self._flush(req, token, hold=0)
            self._finish(req, "length")

    def _decode(self, req: Request) -> None:
        if req.decoded != len(req.generated):
            req.text = self.tok.decode(req.generated)
            req.decoded = len(req.generated)

    def _flush(self, req: Request, token: int, hold: int) -> None:
        """Send text not yet sent, keeping back what could still become a stop string (or half a character)."""
        end = len(req.text) - hold
        while end > req.sent and req.text[end - 1] == "\ufffd" and hold:
            end -= 1
        req.unflushed = 0
        req.flushed_at = time.monotonic()
        if end > req.sent:
            req.emit(TokenEvent(req.text[req.sent:end], token))
            req.sent = end

    def _finish(self, req: Request, reason: str | None, error: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1
        if req in self.running:
            self.running.remove(req)
        if req.adapter is not None and req.lora_slot:
            self.adapters.release(req.adapter)
            req.lora_slot = 0
        if error is not None:
            req.emit(ErrorEvent(error))
            return
        if reason != "stop" or not req.stop_strings:
            self._decode(req)  # (a stop-string finish already cut the text)
        self._flush(req, req.generated[-1] if req.generated else -1, hold=0)
        self.stats[f"finished_{reason}"] += 1
        req.emit(FinishEvent(reason, len(req.prompt_ids), len(req.generated), list(req.generated), req.text))
