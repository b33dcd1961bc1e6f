"""The sentencepiece tokenizer and the Llama 2 chat template, as Meta's reference has them.

`encode_dialog` reproduces `Llama.chat_completion` of Meta's `llama/generation.py` token for
token; `dialog_segments` exposes the same text split into prompt and answer pieces so that
fine-tuning can put the loss on answers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import sentencepiece as spm

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read."""


class DialogError(ValueError):
    """A dialog the Llama 2 chat template cannot express (or refuses: injected tags)."""


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from e
        self.path = path
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words])


@dataclass(frozen=True)
class Segment:
    """One sentencepiece call of the chat template: its text, the BOS/EOS around it."""

    text: str
    bos: bool
    eos: bool
    answer_start: int | None = None  # char offset where the assistant answer begins, if any


def dialog_segments(dialog: list[Message]) -> list[Segment]:
    """The Llama 2 chat template: system folded into the first user turn, roles alternating.

    Every complete (user, assistant) pair is one `<s>[INST] u [/INST] a </s>` segment; a final
    user turn is the open `<s>[INST] u [/INST]` the model answers. A dialog that ends with an
    assistant turn (training data) has no open segment.
    """
    if not dialog:
        raise DialogError("dialog is empty")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DialogError(f"message {i}: needs 'role' and 'content'")
        if msg["role"] not in ("system", "user", "assistant"):
            raise DialogError(f"message {i}: role {msg['role']!r} is not system, user or assistant")
        if not isinstance(msg["content"], str):
            raise DialogError(f"message {i}: content must be a string")
        if any(tag in msg["content"] for tag in SPECIAL_TAGS):
            raise DialogError(f"message {i}: special tags {list(SPECIAL_TAGS)} are not allowed in content")
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise DialogError("a system message must be followed by a user message")
        first = dialog[1]
        dialog = [{"role": first["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + first["content"]},
                  *dialog[2:]]
    for i, msg in enumerate(dialog):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise DialogError(f"turn {i}: expected role {want!r}, got {msg['role']!r} "
                              "(roles must alternate user/assistant, with an optional system first)")
    segments = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        head = f"{B_INST} {prompt['content'].strip()} {E_INST} "
        segments.append(Segment(head + f"{answer['content'].strip()} ", True, True, answer_start=len(head)))
    if len(dialog) % 2 == 1:
        segments.append(Segment(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", True, False))
    return segments


def encode_dialog(tokenizer: Tokenizer, dialog: list[Message]) -> list[int]:
    """Prompt tokens for a dialog that ends with a user turn (what chat completion sends)."""
    segments = dialog_segments(dialog)
    if dialog[-1]["role"] != "user":
        raise DialogError("the last message must come from the user")
    ids: list[int] = []
    for seg in segments:
        ids += tokenizer.encode(seg.text, bos=seg.bos, eos=seg.eos)
    return ids
