"""`--pack`: several examples per training sequence, each still seen exactly as if alone.

Short chat examples padded to a batch's longest waste most of the compute; packing fills each
row up to `max_seq_len` with whole examples instead (first-fit over examples sorted by length,
deterministic). Each example keeps its own positions (they restart at 0) and attends only to
itself: the attention mask is block-diagonal and causal within a block, built from document ids.
So a packed batch gives the same per-token losses as the same examples unpacked.
"""

from __future__ import annotations

import torch

from llama.sft_data import IGNORE, Example


def pack_examples(lengths: list[int], max_len: int) -> list[list[int]]:
    """Example indices per packed row: first-fit decreasing, the same on every worker."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


class DocumentMask:
    """The attention mask of packed rows, given to the model in place of a KV cache.

    The model's attention asks a cache for keys/values and a mask (llama.model.KVCache); for a
    training forward nothing is cached, so `update` returns this step's keys and values as they
    are, and `attention_mask` is True where query and key belong to the same document and the key
    is not in the future.
    """

    def __init__(self, doc_ids: torch.Tensor):
        t = doc_ids.shape[1]
        same = doc_ids[:, :, None] == doc_ids[:, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
        self.mask = (same & causal)[:, None]  # [B, 1, T, T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def attention_mask(self) -> torch.Tensor:
        return self.mask

    def attend_in_place(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        return None  # attention over the masked keys/values above, by the model's own kernels


def collate_packed(rows: list[list[Example]], pad_id: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows -> (tokens, labels, positions, document ids), each [B, T].

    Padding gets a document id of its own per row (so no row of the mask is empty) and no loss;
    each example's first label is ignored, so no token is ever predicted across a boundary.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    b = len(rows)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    docs = torch.full((b, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, e in enumerate(row):
            n = len(e.input_ids)
            tokens[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE
            positions[r, at:at + n] = torch.arange(n)
            docs[r, at:at + n] = d
            at += n
        positions[r, at:] = torch.arange(width - at)
    return tokens, labels, positions, docs
