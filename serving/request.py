"""A generation request as the engine tracks it, and the events it sends back to its caller."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from llama.generation import SamplingParams
from serving.adapters import AdapterKey
from serving.detokenizer import IncrementalDetokenizer


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
    status: int = 500  # the HTTP status the caller should answer with
    code: str = "engine_error"


_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    stop_strings: tuple[str, ...] = ()
    adapter: AdapterKey | None = None
    id: int = field(default_factory=_ids.__next__)
    # engine state
    seed: int = 0  # the sampling seed (params.seed, or one drawn at submission)
    block_table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens (prompt, then generated) whose K/V are in the cache
    lora_slot: int = 0
    generated: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    cancelled: bool = False
    done: bool = False
    preemptions: int = 0
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    unflushed: int = 0  # tokens accepted since text was last sent
    flushed_at: float = 0.0  # monotonic time text was last sent

    @property
    def tokens(self) -> list[int]:
        """Everything the model has seen or will see: the prompt, then what was generated."""
        return self.prompt_ids + self.generated

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def text(self) -> str:
        return self.detok.text if self.detok else ""
