"""Throughput levers that bench/gpu.py measures before any of them enters the kit.

Each is a context manager that changes a loaded model (the kit's `ReplitForCausalLM`, the
base of a peft model) for the steps run inside it and restores it on exit, so that one
GPU run times the step with and without it on the same weights. They stay here, out of
the library, until a measurement shows one faster at equal losses.

- `compiled_blocks`: regional `torch.compile` of each transformer block (norms, peft's
  LoRA layers, bitsandbytes' 4-bit matmuls, GELU, residuals), attention excluded (flex
  is compiled on its own; the others are kernels already). The blocks share one graph.
- `attention_output_kept`: selective checkpointing. Each block is checkpointed in two
  parts around attention, which runs outside both: backward then recomputes norm_1 and
  the qkv projection, but not attention, whose output and saved inputs (q, k, v, and
  the log-sum-exp) are kept: about 4 more L x d_model bf16 tensors per block.
- `checkpointing_off`: no activation checkpointing at all. A step then does 4N FLOPs per
  token instead of 6N (no recomputed forward) and keeps every block's activations, about
  114 KB per token per block at full width (counted on CPU, leaving out sdpa's L x L
  tensor, which flex does not save): ~3.6 MB per token over 32 blocks, so a 4 x 2048
  micro-batch fits an 80 GB card easily and 1 x 16384 only just. The recipes can already turn it off
  (`train.gradient_checkpointing: false`); measured here, it tells which rows should.
- `bf16_blocks`: the norms hand the autocast dtype on. Under autocast a LayerNorm returns
  fp32, and bitsandbytes casts each 4-bit matmul's output back to its input's dtype, so
  today a block's projections, LoRA sums and GELU all run on fp32 tensors (the FFN's
  L x 10240 ones included) although every matmul computes in bf16. Cast to bf16 after
  the norm, they stay bf16; the residual stream stays fp32. Without checkpointing a block
  then keeps 104 KB per token instead of 114.
- `bf16_residual`: `bf16_blocks`, and the embedding's output in bf16 too, so the residual
  stream (the block inputs that checkpointing keeps: 10 KB per token per block in fp32)
  is bf16 as well: with checkpointing, half the memory a long row keeps, at some precision.

Two more levers are measured by their ceiling rather than built (see bench/gpu.py):
`loss_seconds` (a fused loss kernel could save at most this) and `dequant_seconds`
(dequantizing once per layer per pass instead of three times could save at most two
thirds of this per pass).
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from model import attention, modeling


@contextlib.contextmanager
def compiled_blocks(base: torch.nn.Module) -> Iterator[None]:
    """Every block compiled by `torch.compile` (static shapes), attention left eager."""
    import torch._dynamo

    saved = dict(attention.BACKENDS)
    for name, fn in saved.items():
        modeling.BACKENDS[name] = torch.compiler.disable(fn)
    # 32 blocks whose 4-bit quant states are separate Python objects may each need a graph
    # (torch < 2.7 calls the limit cache_size_limit).
    limit = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else ("cache_size_limit")
    )
    blocks = list(base.transformer.blocks)
    try:
        with torch._dynamo.config.patch({limit: 128}):
            for block in blocks:
                block.compile(dynamic=False)
            yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        modeling.BACKENDS.update(saved)
        torch._dynamo.reset()


def _forward_keeping_attention(self, x, layout, attn_impl, cache=None):
    """ReplitBlock.forward in two checkpoints around attention (see the module docstring)."""
    attn = self.attn

    def qkv(x):
        batch, length, width = x.shape
        h = attn.Wqkv(self.norm_1(x)).view(batch, length, 3, attn.n_heads, attn.head_dim)
        return h.permute(2, 0, 3, 1, 4).unbind(0)

    def rest(x, out):
        batch, length, width = x.shape
        x = x + attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return modeling.per_token_chunks(self._mlp, x)

    q, k, v = checkpoint(qkv, x, use_reentrant=False)
    out = modeling.BACKENDS[attn_impl](q, k, v, layout, attn.scale)
    return checkpoint(rest, x, out, use_reentrant=False)


@contextlib.contextmanager
def attention_output_kept(base: torch.nn.Module) -> Iterator[None]:
    """Selective checkpointing that keeps attention's output; needs checkpointing on."""
    blocks = list(base.transformer.blocks)
    if not all(getattr(b, "gradient_checkpointing", False) for b in blocks):
        raise ValueError("attention_output_kept replaces block checkpointing: turn it on first")
    for block in blocks:
        block.gradient_checkpointing = False
        block.forward = types.MethodType(_forward_keeping_attention, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
            block.gradient_checkpointing = True


@contextlib.contextmanager
def checkpointing_off(base: torch.nn.Module) -> Iterator[None]:
    """Activation checkpointing off for the steps inside; needs it on before."""
    blocks = list(base.transformer.blocks)
    if not all(getattr(b, "gradient_checkpointing", False) for b in blocks):
        raise ValueError("checkpointing_off compares against checkpointing: turn it on first")
    for block in blocks:
        block.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in blocks:
            block.gradient_checkpointing = True


def _autocast_dtype_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = type(self).forward(self, x)
    kind = out.device.type
    return out.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else out


@contextlib.contextmanager
def bf16_activations(base: torch.nn.Module, residual: bool) -> Iterator[None]:
    """`bf16_blocks` (residual=False) or `bf16_residual` (see the module docstring)."""
    blocks = base.transformer.blocks
    modules = [b.norm_1 for b in blocks] + [b.norm_2 for b in blocks]
    if residual:
        modules.append(base.transformer.wte)
    for module in modules:
        module.forward = types.MethodType(_autocast_dtype_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _seconds(fn, repeats: int = 5) -> float:
    """Median wall time of `fn` after one warm-up, synchronized on CUDA."""

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def loss_seconds(base: torch.nn.Module, rows: int, length: int, device_type: str) -> float:
    """Forward + backward of the kit's chunked loss alone on a step's hidden states."""
    weight = base.transformer.wte.weight
    device = weight.device
    hidden = torch.randn(rows, length, weight.shape[1], device=device, requires_grad=True)
    labels = torch.randint(3, weight.shape[0], (rows, length), device=device)

    def run() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = modeling.lm_loss(hidden, weight, labels)
        loss.backward()
        hidden.grad = None

    return _seconds(run)


def dequant_seconds(base: torch.nn.Module) -> float | None:
    """Dequantizing every 4-bit weight once (what a forward pass does), or None if none."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weights = [
        m.weight for m in base.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.numel()
    ]
    if not weights:
        return None

    def run() -> None:
        for w in weights:
            bnbf.dequantize_4bit(w.data, w.quant_state)

    return _seconds(run)
