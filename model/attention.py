"""ALiBi attention for replit-code-v1-3b behind one switch: eager, sdpa, flash, flex.

Every backend computes the same thing: causal softmax attention with the ALiBi bias
`-slope_h * (i - j)` added in fp32, where query i may see key j only if j is not in
the future, is not padding, and belongs to the same document. What a batch looks like
(padding, documents, cached keys) is worked out once per forward in a `BatchLayout`;
each backend derives the mask or index tensors it needs from it once, on first use,
and every layer reuses them.

Documents: in a packed row, `position_ids` restart at 0 where a new document starts
(the convention of trl's and transformers' padding-free batches). Positions do not
enter the bias, which depends on `i - j` only and so is the same for a document
whether it sits alone or inside a packed row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("eager", "sdpa", "flash", "flex")


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """The per-head ALiBi slopes of MPT, in fp32: `2**(-k * bias_max / p)`, p a power of 2."""
    p = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-torch.arange(1, p + 1, dtype=torch.float64) * alibi_bias_max / p)
    if p != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.float()


@dataclass
class BatchLayout:
    """Where each query may look, for one forward pass; shared by all layers.

    `segments[b, t]` numbers the runs of tokens of row b that attend only among
    themselves (one document, or one run of padding); None means one run per row.
    It is only used without cached keys. `key_valid[b, j]` is False for padding keys;
    None means no padding.
    """

    slopes: torch.Tensor
    q_len: int
    past_len: int
    key_valid: torch.Tensor | None
    segments: torch.Tensor | None
    derived: dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        slopes: torch.Tensor,
        q_len: int,
        past_len: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> BatchLayout:
        """Read padding from `attention_mask` [B, past+q] and documents from `position_ids`."""
        key_valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past_len + q_len:
                raise ValueError(
                    f"attention_mask must have shape [batch, {past_len + q_len}] (cached + new "
                    f"tokens), got {list(attention_mask.shape)}"
                )
            key_valid = attention_mask.bool()
            if bool(key_valid.all()):
                key_valid = None
        segments = None
        if past_len == 0:
            starts = torch.zeros(1, dtype=torch.bool, device=slopes.device)
            if position_ids is not None:
                starts = position_ids == 0
            if key_valid is not None:
                change = torch.zeros_like(key_valid)
                change[:, 1:] = key_valid[:, 1:] != key_valid[:, :-1]
                starts = starts | change
            if starts.dim() == 2 and bool(starts[:, 1:].any()):
                starts = starts.clone()
                starts[:, 0] = False
                segments = starts.cumsum(1)
        return cls(slopes, q_len, past_len, key_valid, segments)

    def cached(self, key: str, make: Callable[[], object]) -> object:
        """Compute a backend's derived tensors once per forward."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    def dense_bias(self) -> torch.Tensor:
        """The additive mask [B or 1, H, q, past+q], fp32: ALiBi where allowed, else -inf.

        A query that may see no key at all (a padding token) sees itself, so that
        no row of the softmax is empty and no NaN can appear.
        """
        device = self.slopes.device
        i = torch.arange(self.past_len, self.past_len + self.q_len, device=device)[:, None]
        j = torch.arange(self.past_len + self.q_len, device=device)[None, :]
        allowed = (j <= i)[None]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, :]
        if self.segments is not None:
            allowed = allowed & (self.segments[:, :, None] == self.segments[:, None, :])
        allowed = allowed | (j == i)[None]
        bias = -self.slopes[:, None, None] * (i - j).float()
        return bias[None].masked_fill(~allowed[:, None], float("-inf"))

    def runs(self) -> list[list[tuple[int, int, bool]]]:
        """Per row, the (start, end, is_padding) runs of `segments`; one host sync per forward."""
        seg = self.segments.tolist()
        valid = self.key_valid.tolist() if self.key_valid is not None else None
        rows = []
        for b, row in enumerate(seg):
            bounds = [t for t in range(1, len(row)) if row[t] != row[t - 1]]
            edges = [0, *bounds, len(row)]
            pad = [False] * len(row) if valid is None else [not v for v in valid[b]]
            rows.append([(s, e, pad[s]) for s, e in itertools.pairwise(edges)])
        return rows


def eager_attention(q, k, v, layout: BatchLayout, scale: float) -> torch.Tensor:
    """The reference: scores, bias and softmax in fp32, the whole score matrix in memory.

    O(L^2) memory by design ([B, H, L, L] fp32 scores and bias): the backend the others are
    checked against, not one to train long rows with.
    """
    bias = layout.cached("dense", layout.dense_bias)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _hankel_table(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """u[h, n] = bias of query i and key j with n = i + (length-1-j): ALiBi where j <= i, else -inf.

    With the keys of a sequence in reverse order, the causal ALiBi bias of query i and
    reversed key j' depends on i + j' only, so the [H, L, L] mask is a strided view of
    this [H, 2L-1] table: O(L) memory instead of O(L^2), which is what lets SDPA's
    fused CPU kernel run at long context (measured: 0.3 GB instead of 4.3 GB at 4096).
    """
    rel = (length - 1) - torch.arange(2 * length - 1, device=slopes.device, dtype=torch.float32)
    return (slopes[:, None] * rel).masked_fill(rel > 0, float("-inf")).contiguous()


def _hankel_mask(table: torch.Tensor, length: int) -> torch.Tensor:
    """The [1, H, L, L] causal ALiBi mask for reversed keys, as a view of a `_hankel_table`."""
    n_heads, width = table.shape
    offset = (width + 1) // 2 - length
    return table.as_strided((1, n_heads, length, length), (0, width, 1, 1), offset)


def _sdpa_reversed(q, k, v, table: torch.Tensor, scale: float) -> torch.Tensor:
    mask = _hankel_mask(table, q.shape[2])
    return F.scaled_dot_product_attention(q, k.flip(2), v.flip(2), attn_mask=mask, scale=scale)


def _mask_dtype(layout: BatchLayout, key: str, make: Callable[[], torch.Tensor], q):
    """The fp32 mask `key` of `layout`, or on CUDA its copy in q's dtype (cached too).

    On CPU the fp32 mask keeps ALiBi exact with bf16 inputs. CUDA's fused SDPA kernel
    takes an fp32 mask with bf16 inputs without complaint and returns NaN (measured on
    an H200, torch 2.11), so there it gets q's dtype: the bias is then rounded to bf16
    like the scores it is added to.
    """
    mask = layout.cached(key, make)
    if q.device.type != "cuda" or mask.dtype == q.dtype:
        return mask
    return layout.cached(f"{key}-{q.dtype}", lambda: mask.to(q.dtype))


def sdpa_attention(q, k, v, layout: BatchLayout, scale: float) -> torch.Tensor:
    """torch SDPA with an O(L) ALiBi mask; one call per document in packed or padded rows.

    On CPU the fused kernel reads the mask through its strides. On CUDA the memory-efficient
    kernel wants every stride but the last aligned to 8 elements, so torch copies the view
    into a padded [H, n, n] tensor per call (`preprocess_mask` in torch's SDPA): O(n^2)
    memory per document of n tokens. Use flex or flash for long rows on CUDA.
    """
    if layout.past_len:
        bias = _mask_dtype(layout, "dense", layout.dense_bias, q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    table = _mask_dtype(layout, "hankel", lambda: _hankel_table(layout.slopes, layout.q_len), q)
    if layout.segments is None:
        return _sdpa_reversed(q, k, v, table, scale)
    rows = []
    for b, runs in enumerate(layout.cached("runs", layout.runs)):
        parts = []
        for s, e, padding in runs:
            sl = (slice(b, b + 1), slice(None), slice(s, e))
            if padding:
                parts.append(torch.zeros_like(q[sl]))
            else:
                parts.append(_sdpa_reversed(q[sl], k[sl], v[sl], table, scale))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def _flash_varlen() -> Callable:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "attn_impl='flash' needs flash-attn >= 2.4 (CUDA): pip install 'replit-ft[flash]'"
        ) from err
    return flash_attn_varlen_func


def _flash_index(layout: BatchLayout, batch: int) -> dict[str, object]:
    """Token indices and cumulative sequence lengths for flash-attn's varlen kernel.

    Each document (or, with cached keys, each row) is one varlen sequence; padding
    is dropped. With cached keys the new queries are the last ones of their row,
    which the kernel's bottom-right causal alignment expects.
    """
    device = layout.slopes.device
    k_len = layout.past_len + layout.q_len
    key_valid = layout.key_valid
    if key_valid is None:
        key_valid = torch.ones(batch, k_len, dtype=torch.bool, device=device)
    q_valid = key_valid[:, layout.past_len :]
    if layout.past_len == 0 and layout.segments is not None:
        lengths = [e - s for runs in layout.runs() for s, e, padding in runs if not padding]
        lengths_q = lengths_k = torch.tensor(lengths, device=device)
    else:
        lengths_q, lengths_k = q_valid.sum(1), key_valid.sum(1)

    def cu(lengths: torch.Tensor) -> torch.Tensor:
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    return {
        "q_idx": q_valid.flatten().nonzero().squeeze(1),
        "k_idx": key_valid.flatten().nonzero().squeeze(1),
        "cu_q": cu(lengths_q),
        "cu_k": cu(lengths_k),
        "max_q": int(lengths_q.max()),
        "max_k": int(lengths_k.max()),
    }


def flash_attention(q, k, v, layout: BatchLayout, scale: float) -> torch.Tensor:
    """flash-attn's varlen kernel with `alibi_slopes`: no mask in memory, padding skipped."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_impl='flash' needs bf16 or fp16 compute, got {q.dtype}")
    batch, heads, q_len, dim = q.shape
    ix = layout.cached("flash", lambda: _flash_index(layout, batch))

    def unpad(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(-1, heads, dim).index_select(0, idx)

    out = _flash_varlen()(
        unpad(q, ix["q_idx"]),
        unpad(k, ix["k_idx"]),
        unpad(v, ix["k_idx"]),
        ix["cu_q"],
        ix["cu_k"],
        ix["max_q"],
        ix["max_k"],
        softmax_scale=scale,
        causal=True,
        alibi_slopes=layout.slopes,
    )
    full = out.new_zeros(batch * q_len, heads, dim).index_copy(0, ix["q_idx"], out)
    return full.view(batch, q_len, heads, dim).transpose(1, 2)


_compiled_flex: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    """FlexAttention, compiled on CUDA (uncompiled it materializes the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# FlexAttention's tile: the block mask says, per 128 queries, which 128-key blocks to visit.
FLEX_BLOCK = 128


def _segment_starts(layout: BatchLayout) -> torch.Tensor:
    """[rows, L]: the index of the first token of each token's segment (row 1 when no segments)."""
    device = layout.slopes.device
    n = layout.q_len
    if layout.segments is None:
        return torch.zeros(1, n, dtype=torch.long, device=device)
    segments = layout.segments
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(first, torch.arange(n, device=device), 0).cummax(1).values


def _flex_block_mask(layout: BatchLayout):
    """The causal + document `BlockMask`, built from the segments' starts in O((L/128)^2) ints.

    `create_block_mask` evaluates the mask on every (query, key) pair: uncompiled, that is
    L x L index tensors (128 GiB at 131072 tokens, measured on an H100). Segments are
    contiguous runs, so the visible keys of query block i are one range of key blocks:
    from the block holding the start of the segment of i's first token, up to i itself.
    Within it, block j < i is full (no masking at all) when block i is complete and lies
    in one segment that began at or before j's first token; the others are partial and
    get the mask_mod. This yields exactly the blocks `create_block_mask` finds
    (tests/test_attention.py compares them).
    """
    from torch.nn.attention.flex_attention import BlockMask

    n, size = layout.q_len, FLEX_BLOCK
    device = layout.slopes.device
    blocks = -(-n // size)
    start = _segment_starts(layout)
    i = torch.arange(blocks, device=device)
    first_tok, last_tok = i * size, torch.clamp((i + 1) * size, max=n) - 1
    lo = start[:, first_tok] // size  # [rows, blocks]: first visible key block
    full_lo = torch.minimum(-(-start[:, last_tok] // size), i)  # first full key block
    full_lo = torch.where((i + 1) * size <= n, full_lo, i)  # a cut-off block is never full
    lo, full_lo, i = lo.int(), full_lo.int(), i.int()
    col = torch.arange(blocks, dtype=torch.int32, device=device)
    # Partial blocks lo .. full_lo-1, then the diagonal block i; full blocks full_lo .. i-1.
    # Entries past each row's count are never read; they repeat valid indices.
    partial = torch.where(col < (full_lo - lo)[..., None], lo[..., None] + col, i[:, None])
    full = torch.where(col < (i - full_lo)[..., None], full_lo[..., None] + col, 0)
    segments = layout.segments

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def causal_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    return BlockMask.from_kv_blocks(
        (full_lo - lo + 1)[:, None],
        partial[:, None],
        (i - full_lo)[:, None],
        full[:, None],
        BLOCK_SIZE=size,
        mask_mod=causal if segments is None else causal_document,
        seq_lengths=(n, n),
    )


def flex_attention(q, k, v, layout: BatchLayout, scale: float) -> torch.Tensor:
    """FlexAttention with an ALiBi score_mod and a causal+document block mask.

    Padding runs are their own segments, so they never reach a real token. Decoding
    steps with cached keys go through SDPA: a block mask per generated token would
    cost more than the attention itself.
    """
    if layout.past_len:
        return sdpa_attention(q, k, v, layout, scale)
    slopes = layout.slopes
    block_mask = layout.cached("flex", lambda: _flex_block_mask(layout))

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    return _flex_fn(q.device)(q, k, v, score_mod=alibi, block_mask=block_mask, scale=scale)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "flex": flex_attention,
}


def usable_attn_impls(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends `resolve_attn_impl` accepts here (flash only with its wheel, CUDA, half)."""
    usable = []
    for impl in ATTN_IMPLS:
        try:
            resolve_attn_impl(impl, device, dtype)
        except (ImportError, ValueError):
            continue
        usable.append(impl)
    return usable


def resolve_attn_impl(attn_impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn `auto` into the fastest backend usable here; check an explicit choice is usable."""
    if attn_impl not in (*ATTN_IMPLS, "auto"):
        raise ValueError(
            f"attn_impl must be one of auto, {', '.join(ATTN_IMPLS)}; got {attn_impl!r}"
        )
    half = dtype in (torch.float16, torch.bfloat16)
    if attn_impl == "auto":
        if device.type != "cuda":
            return "sdpa"
        try:
            _flash_varlen()
        except ImportError:
            return "flex"
        return "flash" if half else "flex"
    if attn_impl == "flash":
        if device.type != "cuda":
            raise ValueError("attn_impl='flash' runs on CUDA only; use 'sdpa' on CPU")
        _flash_varlen()
        if not half:
            raise ValueError(f"attn_impl='flash' needs bf16 or fp16 compute, got {dtype}")
    return attn_impl
