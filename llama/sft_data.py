"""Instruction/chat training data: JSONL in, token ids with answer-only labels out.

A line is `{"prompt": ..., "completion": ...}` or `{"messages": [{"role", "content"}, ...]}`.
Both are rendered with the Llama 2 chat template (a prompt/completion pair is one user turn and
one assistant turn), and the loss covers only what the assistant says: its answer tokens and
the EOS that closes each turn, as in Meta's fine-tuning recipes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llama.tokenizer import DialogError, Message, Tokenizer, dialog_segments

IGNORE = -100


class DataError(ValueError):
    """A training file that cannot be used; the message starts with FILE:LINE."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def record_to_dialog(record: object) -> list[Message]:
    """One parsed JSON line -> a dialog ending with an assistant turn (raises DialogError)."""
    if not isinstance(record, dict):
        raise DialogError("expected a JSON object")
    if "messages" in record:
        extra = set(record) - {"messages"}
        if extra:
            raise DialogError(f"unexpected keys {sorted(extra)} next to 'messages'")
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DialogError("'messages' must be a list")
        dialog = messages
    elif "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if k not in record]
        if missing:
            raise DialogError(f"missing field {missing[0]!r}")
        extra = set(record) - {"prompt", "completion"}
        if extra:
            raise DialogError(f"unexpected keys {sorted(extra)} next to prompt/completion")
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DialogError("'prompt' and 'completion' must be strings")
        if not record["completion"].strip():
            raise DialogError("'completion' is empty")
        dialog = [{"role": "user", "content": record["prompt"]},
                  {"role": "assistant", "content": record["completion"]}]
    else:
        raise DialogError("expected {'prompt', 'completion'} or {'messages': [...]}")
    dialog_segments(dialog)  # roles, alternation, injected tags
    if dialog[-1]["role"] != "assistant":
        raise DialogError("the last message must come from the assistant (it is what the model learns)")
    return dialog


def read_dataset(path: str | Path) -> list[list[Message]]:
    """Validate a whole JSONL file; the first bad line raises DataError('FILE:LINE: reason')."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training data file not found")
    dialogs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            try:
                dialogs.append(record_to_dialog(record))
            except DialogError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not dialogs:
        raise DataError(f"{path}:1: the file has no examples")
    return dialogs


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenize_dialog(tok: Tokenizer, dialog: list[Message], max_seq_len: int) -> Example:
    """Chat-template tokens with labels on assistant tokens only, truncated to `max_seq_len`."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in dialog_segments(dialog):
        seg_ids = tok.encode(seg.text, bos=seg.bos, eos=seg.eos)
        n_prompt = len(seg_ids) if seg.answer_start is None else _prompt_len(tok, seg, seg_ids)
        ids += seg_ids
        labels += [IGNORE] * n_prompt + seg_ids[n_prompt:]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def _prompt_len(tok: Tokenizer, seg, seg_ids: list[int]) -> int:
    """Tokens of `<s>[INST] ... [/INST]` inside the whole turn's tokens.

    The turn is tokenized in one piece (exactly as Meta's template does); the prompt part
    tokenized alone is almost always a prefix of it, and where a merge crosses the boundary we
    take the longest common prefix, so no answer token is ever hidden from the loss.
    """
    head = tok.encode(seg.text[: seg.answer_start].rstrip(" "), bos=seg.bos)
    n = 0
    while n < min(len(head), len(seg_ids)) and head[n] == seg_ids[n]:
        n += 1
    return n
