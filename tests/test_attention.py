"""Attention backends against the eager reference on layouts the model tests cannot reach on CPU.

flash-attn needs CUDA, so its index bookkeeping (unpadding, document boundaries,
cached keys) is checked here against an independent per-sequence reference that
stands in for `flash_attn_varlen_func` with the semantics flash-attn documents:
causal masks aligned to the bottom right, bias `-slope * (i + k_len - q_len - j)`.
"""

from __future__ import annotations

import pytest
import torch

from model import attention
from model.attention import BatchLayout, alibi_slopes, eager_attention, sdpa_attention

H, D = 4, 16
SCALE = D**-0.5


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, alibi_slopes):
    assert causal and q.dtype == torch.bfloat16 and alibi_slopes.dtype == torch.float32
    out = torch.zeros_like(q)
    for n in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        lq, lk = qs.stop - qs.start, ks.stop - ks.start
        assert lq <= max_q and lk <= max_k
        scores = torch.einsum("qhd,khd->hqk", q[qs].float(), k[ks].float()) * softmax_scale
        i = torch.arange(lq)[:, None] + lk - lq
        j = torch.arange(lk)[None, :]
        scores = scores - alibi_slopes[:, None, None] * (i - j)
        scores = scores.masked_fill(j > i, float("-inf"))
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks].float()).to(q.dtype)
    return out


def packed_layout():
    """Row 0: documents of 5, 9, 6 tokens; row 1: 12 tokens then 8 of padding."""
    pos = torch.tensor([list(range(5)) + list(range(9)) + list(range(6)), list(range(20))])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 12:] = 0
    return BatchLayout.build(alibi_slopes(H), 20, 0, mask, pos), mask.bool()


def decode_layout():
    """Left-padded rows (3 and 0 pads), 10 cached keys, 2 new tokens."""
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    return BatchLayout.build(alibi_slopes(H), 2, 10, mask, None), mask[:, 10:].bool()


@pytest.mark.parametrize("make", [packed_layout, decode_layout])
def test_flash_index_bookkeeping_matches_eager(monkeypatch, make):
    monkeypatch.setattr(attention, "_flash_varlen", lambda: reference_varlen)
    layout, valid_q = make()
    q = torch.randn(2, H, layout.q_len, D).bfloat16()
    k, v = (torch.randn(2, H, layout.past_len + layout.q_len, D).bfloat16() for _ in range(2))
    want = eager_attention(q, k, v, layout, SCALE)
    got = attention.flash_attention(q, k, v, layout, SCALE)
    rows = valid_q[:, None, :, None].expand_as(want)
    assert (got.float() - want.float())[rows].abs().max() <= 1e-2
    assert torch.equal(got[~rows], torch.zeros_like(got[~rows]))


@pytest.mark.parametrize("make", [packed_layout, decode_layout])
def test_sdpa_matches_eager_in_fp32_and_bf16(make):
    layout, valid_q = make()
    rows = valid_q[:, None, :, None]
    q = torch.randn(2, H, layout.q_len, D)
    k, v = (torch.randn(2, H, layout.past_len + layout.q_len, D) for _ in range(2))
    for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)]:
        args = [t.to(dtype) for t in (q, k, v)]
        diff = sdpa_attention(*args, layout, SCALE).float() - eager_attention(*args, layout, SCALE)
        assert diff[rows.expand_as(diff)].abs().max() <= tol, dtype


def test_hankel_mask_is_the_causal_alibi_bias():
    n = 9
    table = attention._hankel_table(alibi_slopes(H), 16)
    mask = attention._hankel_mask(table, n)[0]  # keys reversed: column c is key n-1-c
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = (-alibi_slopes(H)[:, None, None] * (i - j)).masked_fill(j > i, float("-inf"))
    assert torch.equal(mask.flip(-1), want)


def test_padding_only_rows_stay_finite():
    mask = torch.zeros(1, 6, dtype=torch.long)
    mask[0, 4:] = 1
    layout = BatchLayout.build(alibi_slopes(H), 6, 0, mask, None)
    q = k = v = torch.randn(1, H, 6, D)
    for fn in (eager_attention, sdpa_attention):
        assert torch.isfinite(fn(q, k, v, layout, SCALE)).all()
