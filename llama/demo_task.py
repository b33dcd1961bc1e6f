"""The demo's synthetic task: pick out the number hidden in a list of names.

    prompt      "Jacob, Moses, 8, Judah."      expected answer "8"

A rule, not a memorised answer: every prompt lists 3-5 items, all names (each a single token of
the tokenizer Herd trains on the KJV text) but one, a digit at a random place; the answer is
that digit, so it is in the prompt and nowhere else. The base model (a language model of
scripture) does not answer with it; a LoRA adapter that learned the rule answers prompts it
never saw. A model that learned only the answer's shape (one digit) scores about 10%.

Why this rule and not a key-value lookup: on this project's 2-core CPU machine a 2-layer
dim-64 model fine-tuned for a few minutes did not get past picking a random value of the prompt
(about 25%) on "Moses:4, Aaron:7. Aaron?"; retrieving by a key needs two attention hops that
such a model learns only after thousands of steps. Finding the one digit is one hop (attend by
content, copy), which a LoRA learns in a few hundred steps.

The held-out split shares no prompt with training: both come from one seeded stream of unique
prompts, cut in two. The generator is deterministic for a seed (Python's `random.Random`).
"""

from __future__ import annotations

import random

# Names that the KJV-trained tokenizer (llama/tiny.py) keeps as one token each.
NAMES = ("Moses", "Aaron", "David", "Saul", "Judah", "Joshua", "Jacob", "Joseph", "Samuel", "Pharaoh",
         "Israel", "Egypt")
DIGITS = tuple("0123456789")
MIN_ITEMS, MAX_ITEMS = 3, 5


def make_example(rng: random.Random) -> dict:
    """One `{"prompt", "completion"}` record drawn from `rng`."""
    n = rng.randint(MIN_ITEMS, MAX_ITEMS)
    items = rng.sample(NAMES, n - 1)
    digit = rng.choice(DIGITS)
    items.insert(rng.randrange(n), digit)
    return {"prompt": ", ".join(items) + ".", "completion": digit}


def task_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`n_train` training and `n_heldout` held-out records; no prompt is in both (nor twice in one)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_heldout:
        row = make_example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def exact_match(reply: str, expected: str) -> bool:
    """The reply is the expected answer, up to surrounding whitespace."""
    return reply.strip() == expected.strip()


def accuracy(replies: list[str], expected: list[str]) -> float:
    """Exact-match accuracy in percent."""
    if not expected:
        return 0.0
    return 100.0 * sum(exact_match(r, e) for r, e in zip(replies, expected)) / len(expected)
