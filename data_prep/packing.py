"""Tokenized documents to fixed-length training rows: chunking, best-fit packing, padding.

Every row is exactly `seq_len` tokens and carries `input_ids`, `labels` (-100 where
no loss: prompt tokens and padding) and `position_ids` that restart at 0 at each
document, which is how the kit's model keeps packed documents apart. Padding at
the end of a row is a run of its own (its positions restart at 0 as well), so it
never joins the last document.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100


@dataclass(frozen=True)
class Piece:
    """A document, or a `seq_len` chunk of a longer one: token ids and which of them train."""

    ids: np.ndarray  # int32
    trained: np.ndarray  # bool, False on prompt tokens


def chunk(ids: np.ndarray, trained: np.ndarray, seq_len: int) -> list[Piece]:
    """Split one tokenized document into pieces of at most `seq_len` tokens, in order."""
    return [
        Piece(ids[s : s + seq_len], trained[s : s + seq_len]) for s in range(0, len(ids), seq_len)
    ]


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of `lengths` grouped into rows of `capacity`.

    Longest first, each into the row whose free space fits it most tightly (ties:
    the earlier row); deterministic for the same lengths.
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (free space, row), sorted
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            row, space = len(rows) - 1, capacity - n
        else:
            space, row = free.pop(k)
            rows[row].append(i)
            space -= n
        if space:
            bisect.insort(free, (space, row))
    return rows


def build_rows(
    pieces: Sequence[Piece], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Lay out `rows` (lists of piece indices) as [n_rows, seq_len] int32 arrays."""
    shape = (len(rows), seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    labels = np.full(shape, IGNORE, dtype=np.int32)
    position_ids = np.zeros(shape, dtype=np.int32)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            p = pieces[i]
            n = len(p.ids)
            input_ids[r, at : at + n] = p.ids
            labels[r, at : at + n] = np.where(p.trained, p.ids, IGNORE)
            position_ids[r, at : at + n] = np.arange(n)
            at += n
        position_ids[r, at:] = np.arange(seq_len - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack(
    pieces: Sequence[Piece], seq_len: int, pad_id: int, *, packed: bool = True
) -> dict[str, np.ndarray]:
    """Pieces into rows: best-fit packed, or (`packed=False`) one piece per padded row."""
    if packed:
        rows = best_fit([len(p.ids) for p in pieces], seq_len)
    else:
        rows = [[i] for i in range(len(pieces))]
    return build_rows(pieces, rows, seq_len, pad_id)
