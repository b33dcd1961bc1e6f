"""Prompt-lookup drafts: guess the next tokens of a greedy request from its own history.

If the last n tokens occurred before, propose what followed them then. It costs no model; a
wrong guess costs only a wider forward, and verification keeps exactly what one-token-at-a-time
decoding would give. Decode is memory-bound at small batches, so checking k guessed tokens
costs about one step.
"""

from __future__ import annotations


def prompt_lookup_draft(history: list[int], k: int, n: int = 3) -> list[int]:
    """Up to `k` drafted tokens (empty if the tail never occurred before).

    A match p tokens back means "the text repeats with period p": the continuation is read
    cyclically, so a match that overlaps the tail (a repeated word, a loop) still drafts k
    tokens instead of the few that follow it so far."""
    if k <= 0:
        return []
    for size in range(n, 0, -1):
        if len(history) <= size:
            continue
        tail = history[-size:]
        for start in range(len(history) - size - 1, -1, -1):
            if history[start:start + size] == tail:
                period = len(history) - size - start
                return [history[-period + j % period] for j in range(k)]
    return []
