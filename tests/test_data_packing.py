"""Packing invariants, by property: every token once, in order, documents kept apart."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.packing import IGNORE, Piece, best_fit, chunk, pack

PAD = 2


def split_runs(positions: np.ndarray) -> list[tuple[int, int]]:
    starts = [t for t in range(len(positions)) if positions[t] == 0] + [len(positions)]
    return list(zip(starts, starts[1:], strict=False))


documents = st.lists(
    st.tuples(st.integers(1, 70), st.integers(0, 70)),  # (prompt-free length, prompt length)
    min_size=1,
    max_size=40,
)


def make_pieces(spec, seq_len: int, seed: int = 0) -> tuple[list[Piece], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    pieces, docs = [], []
    for n_completion, n_prompt in spec:
        ids = rng.integers(3, 32768, n_prompt + n_completion).astype(np.int32)
        trained = np.arange(len(ids)) >= n_prompt
        docs.append(ids)
        pieces += chunk(ids, trained, seq_len)
    return pieces, docs


@settings(max_examples=150, deadline=None)
@given(documents, st.integers(8, 64), st.booleans())
def test_every_token_appears_once_in_order(spec, seq_len, packed):
    pieces, _ = make_pieces(spec, seq_len)
    rows = pack(pieces, seq_len, PAD, packed=packed)
    assert all(a.shape == (len(rows["input_ids"]), seq_len) for a in rows.values())
    found = []
    columns = rows["input_ids"], rows["labels"], rows["position_ids"]
    for ids, labels, pos in zip(*columns, strict=True):
        runs = split_runs(pos)
        for s, e in runs:
            assert np.array_equal(pos[s:e], np.arange(e - s))  # positions restart per document
        found += [(ids[s:e], labels[s:e]) for s, e in runs]
    real = [(i, lab) for i, lab in found if not (np.all(i == PAD) and np.all(lab == IGNORE))]
    assert len(real) == len(pieces)
    used = set()
    for piece in pieces:  # each piece is exactly one run, tokens in order
        match = next(
            k for k, (i, _) in enumerate(real) if k not in used and np.array_equal(i, piece.ids)
        )
        used.add(match)
        labels = real[match][1]
        assert np.array_equal(labels == IGNORE, ~piece.trained)
        assert np.array_equal(labels[piece.trained], piece.ids[piece.trained])
    padding = rows["input_ids"].size - sum(len(p.ids) for p in pieces)
    assert (rows["labels"] == IGNORE).sum() == padding + sum((~p.trained).sum() for p in pieces)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(50, 80))
def test_best_fit_is_a_partition_within_capacity(lengths, capacity):
    rows = best_fit(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # no two rows could be merged: best fit never leaves two rows that fit together half-empty
    sums = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(sums) < 2 or sums[0] + sums[1] > capacity
    assert rows == best_fit(lengths, capacity)


def test_chunks_keep_order_and_lengths():
    ids = np.arange(10, dtype=np.int32)
    parts = chunk(ids, np.ones(10, bool), 4)
    assert [p.ids.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_best_fit_fills_tightly():
    assert best_fit([6, 4, 5, 5, 3, 7], 10) == [[5, 4], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="1..10"):
        best_fit([11], 10)
