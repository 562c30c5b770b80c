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


def layouts_for_block_masks():
    """Packed and padded rows whose boundaries fall inside, between and on 128-token blocks."""
    gen = torch.Generator().manual_seed(5)

    def packed(docs_per_row, width, pad_from=None, left_pad=None, heads=H):
        pos = torch.zeros(len(docs_per_row), width, dtype=torch.long)
        mask = torch.ones(len(docs_per_row), width, dtype=torch.long)
        for r, docs in enumerate(docs_per_row):
            at = 0
            for n in docs:
                n = min(n, width - at)  # the last document is cut at the row's end
                pos[r, at : at + n] = torch.arange(n)
                at += n
            if pad_from and pad_from[r] is not None:
                mask[r, pad_from[r] :] = 0
            if left_pad and left_pad[r]:
                mask[r, : left_pad[r]] = 0
        return BatchLayout.build(alibi_slopes(heads), width, 0, mask, pos)

    random_docs = [torch.randint(1, 300, (12,), generator=gen).tolist() for _ in range(3)]
    return {
        "causal, 700 tokens": BatchLayout.build(alibi_slopes(H), 700, 0, None, None),
        "packed + padded, 1000": packed([[300, 500, 200], [700, 300]], 1000, [None, 700]),
        "on block edges, 1024": packed([[128, 256, 640], [384, 640]], 1024, [None, 896]),
        "left padding, 300": packed([[300], [300]], 300, left_pad=[37, 0]),
        "random documents, 900": packed(random_docs, 900, [None, 801, 128]),
    }


def block_mask_reference(layout: BatchLayout):
    from torch.nn.attention.flex_attention import create_block_mask

    n, segments = layout.q_len, layout.segments
    if segments is None:
        return create_block_mask(lambda b, h, q, k: k <= q, None, None, n, n, device="cpu")

    def causal_document(b, h, q, k):
        return (k <= q) & (segments[b, q] == segments[b, k])

    return create_block_mask(causal_document, segments.shape[0], None, n, n, device="cpu")


@pytest.mark.parametrize("name", list(layouts_for_block_masks()))
def test_flex_block_mask_equals_create_block_mask(name):
    """Every query block visits the same partial and full key blocks, and back again."""
    layout = layouts_for_block_masks()[name]
    got, want = attention._flex_block_mask(layout), block_mask_reference(layout)
    assert got.seq_lengths == want.seq_lengths and got.BLOCK_SIZE == want.BLOCK_SIZE
    for counts, indices in [
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ]:
        n_got, n_want = getattr(got, counts), getattr(want, counts)
        assert torch.equal(n_got, n_want), counts
        i_got, i_want = getattr(got, indices), getattr(want, indices)
        assert i_got.shape == i_want.shape, indices
        used = n_want[..., None] > torch.arange(i_want.shape[-1])  # entries past a count: unused
        assert torch.equal(i_got[used], i_want[used]), indices
    if name.startswith(("causal", "packed", "on block")):  # these layouts have full blocks too
        assert want.full_kv_num_blocks.sum() > 0


@pytest.mark.parametrize("name", ["packed + padded, 1000", "random documents, 900"])
def test_flex_with_the_block_mask_matches_eager(name):
    layout = layouts_for_block_masks()[name]
    rows = layout.segments.shape[0]
    q, k, v = (torch.randn(rows, H, layout.q_len, D) for _ in range(3))
    want = eager_attention(q, k, v, layout, SCALE)
    got = attention.flex_attention(q, k, v, layout, SCALE)
    valid = layout.key_valid if layout.key_valid is not None else torch.ones(rows, layout.q_len)
    keep = valid.bool()[:, None, :, None].expand_as(want)
    assert (got - want)[keep].abs().max() <= 1e-5


def peak_cpu_bytes(fn) -> int:
    """Peak live bytes of CPU allocations made while `fn` runs, its results included.

    torch's profiler records every allocation and free of the CPU allocator (kernels'
    internal temporaries too); the running sum over them in time order peaks here.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_building_a_64k_layout_and_its_block_mask_stays_small():
    """Two packed, padded rows of 65536 tokens: tens of MB, where the L x L masks of
    `create_block_mask` would be 32 GiB of int64. The same measurement does see those
    L x L tensors at 2048 tokens, so it can tell the two apart."""
    n = 65536
    pos = torch.cat([torch.arange(m) for m in (30000, 20001, 15535)]).repeat(2, 1)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 60000:] = 0
    built = []

    def build() -> None:
        layout = BatchLayout.build(alibi_slopes(32), n, 0, mask, pos)
        built.append(attention._flex_block_mask(layout))

    assert peak_cpu_bytes(build) < 64e6
    assert built[0].kv_num_blocks.shape == (2, 1, n // 128)

    small = BatchLayout.build(alibi_slopes(32), 2048, 0, None, pos[:1, 29000:31048])
    assert peak_cpu_bytes(lambda: block_mask_reference(small)) >= 2048 * 2048 * 8
