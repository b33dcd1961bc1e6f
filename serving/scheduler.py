"""What runs in the next engine step: admission, KV blocks, chunked prefill, preemption.

Every step has up to two forwards: one prefill chunk pass over requests whose prompts are not
yet in the cache (a padded batch of at most `prefill_chunk` token cells, so a long prompt is
spread over several steps instead of stalling every running request for its whole length), and one decode
pass over the running requests (one token each, or a speculative window while the batch is
small).

Requests are admitted in arrival order while there is a free row (`max_batch`), their adapter
is resident, and the pool has the blocks their prompt needs. As contexts grow, the running
requests take further blocks; when the pool runs dry, the most recently admitted request is
preempted (vLLM's recompute policy): its blocks are freed and it goes back to the front of the
queue with what it has generated appended to its prompt. Sampling is counter-based, so it then
continues with exactly the tokens it would have produced.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from llama.sampler import SamplingBatch
from serving.adapters import AdapterSlots
from serving.kv_blocks import BlockPool
from serving.request import Request
from serving.runner import StepBatch
from serving.speculation import prompt_lookup_draft


@dataclass
class Plan:
    """One step: the rows of each forward, in the order of the batches' rows."""
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this chunk)
    decode: list[Request] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)
    rejected: list[tuple[Request, BaseException]] = field(default_factory=list)  # adapter failures
    preempted: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


def sampling_of(rows: list[Request]) -> SamplingBatch:
    p = [r.params for r in rows]
    return SamplingBatch([x.temperature for x in p], [x.top_p for x in p], [x.top_k for x in p],
                         [r.seed for r in rows], [len(r.generated) for r in rows])


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, max_seq_len: int, adapters: AdapterSlots | None,
                 prefill_chunk: int = 512, prefill_batch: int = 4, prefill_wait_s: float = 0.05,
                 max_prefills_per_step: int = 16, speculate_tokens: int = 8, speculate_max_batch: int = 4):
        self.pool, self.max_batch, self.max_seq_len = pool, max_batch, max_seq_len
        self.adapters = adapters
        self.prefill_chunk = prefill_chunk
        self.prefill_batch, self.prefill_wait_s = prefill_batch, prefill_wait_s
        self.max_prefills = max_prefills_per_step
        self.speculate_tokens, self.speculate_max_batch = speculate_tokens, speculate_max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []  # admitted, prompt not fully in the cache yet
        self.running: list[Request] = []  # decoding
        self.stats: collections.Counter = collections.Counter()

    @property
    def active(self) -> list[Request]:
        """Admitted requests, oldest admission first."""
        return self.running + self.prefilling

    # ---- planning (engine thread, with the engine's lock held for `waiting`) ---------------------

    def schedule(self) -> Plan:
        plan = Plan()
        self._grow_running(plan)
        self._admit(plan)
        rows = self.prefilling[: self.max_prefills]
        if rows:
            # One padded [rows, width] pass of at most `prefill_chunk` cells: short prompts go whole,
            # a long one is cut into chunks of `width` (never less than 16 tokens).
            remaining = [r.num_tokens - r.computed for r in rows]
            width = min(max(remaining), max(self.prefill_chunk // len(rows), 16))
            plan.prefill = [(r, min(n, width)) for r, n in zip(rows, remaining)]
        return plan

    def _grow_running(self, plan: Plan) -> None:
        """Blocks for every running request's next step; preempt the newest while they run out."""
        rows = list(self.running)
        small = len(rows) <= self.speculate_max_batch and self.speculate_tokens > 0
        drafts = [prompt_lookup_draft(r.tokens, self.speculate_tokens) if small and r.params.temperature == 0
                  else [] for r in rows]
        width = 1 + (self.speculate_tokens if any(drafts) else 0)
        if rows:
            width = max(1, min(width, min(self.max_seq_len - r.computed for r in rows)))
        for req, draft in zip(rows, drafts):
            if req.done or req in plan.preempted:
                continue
            need = self.pool.needed(req.block_table, req.computed + width)
            while need > self.pool.free:
                victim = self._newest_active(exclude=req)
                if victim is None:
                    break
                self._preempt(victim, plan)
            if need > self.pool.free:  # nothing else to take from: this one waits instead
                self._preempt(req, plan)
                continue
            req.block_table += self.pool.take(need)
            plan.decode.append(req)
            plan.drafts.append(draft[: width - 1])

    def _newest_active(self, exclude: Request) -> Request | None:
        for req in reversed(self.prefilling + self.running):
            if req is not exclude:
                return req
        return None

    def _preempt(self, req: Request, plan: Plan) -> None:
        self.pool.give_back(req.block_table)
        req.block_table, req.computed = [], 0
        req.preemptions += 1
        self.stats["preemptions"] += 1
        if req in self.running:
            self.running.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req in plan.decode:
            i = plan.decode.index(req)
            del plan.decode[i], plan.drafts[i]
        plan.preempted.append(req)
        self.waiting.appendleft(req)

    def _admit(self, plan: Plan) -> None:
        """Move waiting requests in while rows, adapters and blocks allow.

        Decode is memory-bound, so a prefill pass costs about the same for one prompt as for
        several: while others decode, a lone new request waits up to `prefill_wait_s` for company."""
        if (self.running and self.waiting and len(self.waiting) < self.prefill_batch
                and not self.waiting[0].preemptions
                and time.monotonic() - self.waiting[0].submitted < self.prefill_wait_s):
            return
        skipped: list[Request] = []
        while self.waiting and len(self.active) < self.max_batch:
            req = self.waiting.popleft()
            if req.cancelled:
                skipped.append(req)  # the engine finishes it
                continue
            if req in plan.preempted:  # not in the same step that preempted it
                skipped.append(req)
                break
            if req.adapter is not None and not req.lora_slot:
                try:
                    slot = self.adapters.acquire(req.adapter)
                except Exception as e:  # noqa: BLE001 - a broken adapter fails only its requests
                    plan.rejected.append((req, e))
                    continue
                if slot is None:  # being fetched, or every slot busy: the others go ahead
                    skipped.append(req)
                    continue
                req.lora_slot = slot
            need = self.pool.needed(req.block_table, req.num_tokens)
            if need > self.pool.free:
                skipped.append(req)
                break  # first come, first served: no overtaking on blocks
            req.block_table += self.pool.take(need)
            self.prefilling.append(req)
        self.waiting.extendleft(reversed(skipped))

    # ---- the step's batches ------------------------------------------------------------------------

    def prefill_batch_of(self, plan: Plan) -> StepBatch:
        rows = [r for r, _ in plan.prefill]
        return StepBatch([r.tokens[r.computed:r.computed + n] for r, n in plan.prefill],
                         [r.computed for r in rows], [r.block_table for r in rows],
                         [r.lora_slot for r in rows], sampling_of(rows))

    def decode_batch_of(self, plan: Plan) -> StepBatch:
        rows = plan.decode
        verify = any(plan.drafts)
        return StepBatch([[r.generated[-1]] + d for r, d in zip(rows, plan.drafts)],
                         [r.computed for r in rows], [r.block_table for r in rows],
                         [r.lora_slot for r in rows], sampling_of(rows), verify=verify)

    def prefilled(self, req: Request, n: int) -> bool:
        """A chunk of `n` tokens is in the cache; True when the whole prompt is (it decodes next)."""
        req.computed += n
        if req.computed < req.num_tokens:
            return False
        self.prefilling.remove(req)
        self.running.append(req)
        return True

    def release(self, req: Request) -> None:
        """A finished request gives back its blocks and its row."""
        self.pool.give_back(req.block_table)
        req.block_table = []
        if req in self.running:
            self.running.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
