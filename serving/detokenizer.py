"""Incremental detokenization: token ids in, text deltas out, never half a character.

Sentencepiece decodes a token differently depending on its neighbours (a leading "▁" becomes a
space except at the start; byte-fallback pieces such as <0xC3><0xA9> are one character only
together). Re-decoding the whole output at every step is correct but quadratic, and slicing a
re-decoded string breaks when completing bytes change its prefix. vLLM's method avoids both:
decode a short window twice, the tokens already emitted (prefix_offset..read_offset) and the
same plus the new ones, and emit the difference once it no longer ends in an incomplete
character (U+FFFD). Each token is decoded a bounded number of times, and the deltas joined are
always exactly the decoded text.

Stop strings are searched only in the tail that new text can complete, and text that could
still become a stop string is held back until it cannot.
"""

from __future__ import annotations

from llama.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tok: Tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # characters of `text` already handed out
        self.stops = stop_strings
        self.hold = max((len(s) - 1 for s in stop_strings), default=0)
        self.decoded_tokens = 0  # tokens passed to the tokenizer, for the cost test
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tok.decode(ids) if ids else ""

    def add(self, token: int) -> None:
        """Take one generated token; complete characters join `text`. Cuts `text` at a stop string."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return  # nothing new yet, or a character still incomplete
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stops:
            self._find_stop(before)

    def _find_stop(self, before: int) -> None:
        start = max(0, before - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def finish(self) -> None:
        """The output ended: whatever is left (even an incomplete character) becomes text."""
        if self.stopped or self.read_offset == len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        if self.stops:
            self._find_stop(before)

    def take(self, final: bool = False) -> str:
        """Text not yet handed out, keeping back what could still become a stop string."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
