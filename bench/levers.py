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
  token instead of 6N (no recomputed forward) and keeps every block's activations:
  186 KB per token per block at full width with LoRA dropout 0.05, leaving out L x L
  tensors, which flex does not save (bench/saved_bytes.py, on CPU). That is ~5.9 MB per
  token over 32 blocks: a 4 x 2048 micro-batch (49 GB) fits an 80 GB card, 1 x 16384
  does not. The recipes can already turn it off (`train.gradient_checkpointing: false`);
  measured here, it tells which rows should.
- `bf16_blocks`: the norms hand the autocast dtype on. Under autocast a LayerNorm returns
  fp32, and bitsandbytes casts each 4-bit matmul's output back to its input's dtype, so
  today a block's projections, LoRA sums and GELU all run on fp32 tensors (the FFN's
  L x 10240 ones included) although every matmul computes in bf16. Cast to bf16 after
  the norm, they stay bf16; the residual stream stays fp32. Without checkpointing a block
  then keeps 165 KB per token instead of 186.
- `bf16_residual`: `bf16_blocks`, and the embedding's output in bf16 too, so the residual
  stream (the block inputs that checkpointing keeps: 10.2 KB per token per block in fp32)
  is bf16 as well: with checkpointing, half the memory a long row keeps (5.1 KB), at some
  precision.
- `fused_lora`: each LoRA layer on a 4-bit base (peft's `Linear4bit`) as one autograd
  node. peft + bitsandbytes run a LoRA projection as some ten kernels, most of them full
  passes over an L x width tensor: the input cast to bf16 and the output back to fp32, a
  defensive clone, dropout, the scaling, the sum. Here: the input cast once, the base
  matmul, the LoRA product added into its output by the same GEMM (`addmm_`), and a
  backward that does the same in reverse; dropout draws the mask peft would draw, and what
  it keeps for backward is bf16 (peft keeps the dropped-out fp32 input): 140 KB per token
  per block without checkpointing instead of 186.
- `fused_lora_w`: `fused_lora` keeping the dequantized weight for backward, so that with
  checkpointing each nf4 weight is dequantized twice per step instead of three times (for
  one block's bf16 weights held while that block's backward runs; without checkpointing,
  every block's).

Two more levers are measured by their ceiling rather than built (see bench/gpu.py):
`loss_seconds` (a fused loss kernel could save at most this) and `dequant_seconds`
(dequantizing every weight once: `fused_lora_w` saves one of a step's three).
"""

from __future__ import annotations

import contextlib
import functools
import time
import types
from collections.abc import Callable, Iterator

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


def _checkpointed_blocks(base: torch.nn.Module, lever: str) -> list[torch.nn.Module]:
    """The blocks, whose checkpointing `lever` replaces: it must be on."""
    blocks = list(base.transformer.blocks)
    if not all(getattr(b, "gradient_checkpointing", False) for b in blocks):
        raise ValueError(f"{lever} replaces block checkpointing: turn it on first")
    return blocks


@contextlib.contextmanager
def checkpointing_off(base: torch.nn.Module) -> Iterator[None]:
    """Activation checkpointing off for the steps inside; needs it on before."""
    blocks = _checkpointed_blocks(base, "checkpointing_off")
    for block in blocks:
        block.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in blocks:
            block.gradient_checkpointing = True


@contextlib.contextmanager
def attention_output_kept(base: torch.nn.Module) -> Iterator[None]:
    """Selective checkpointing that keeps attention's output; needs checkpointing on."""
    _checkpointed_blocks(base, "attention_output_kept")
    with checkpointing_off(base):
        blocks = list(base.transformer.blocks)
        for block in blocks:
            block.forward = types.MethodType(_forward_keeping_attention, block)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward


@contextlib.contextmanager
def attention_backend(base: torch.nn.Module, impl: str) -> Iterator[None]:
    """Attention through backend `impl` for the steps inside (`sdpa`: what `auto` choosing
    it for short rows would give)."""
    saved, base.attn_impl = base.attn_impl, impl
    try:
        yield
    finally:
        base.attn_impl = saved


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


class _LoraLinear4bit(torch.autograd.Function):
    """`base(x) + scaling * dropout(x) @ A.T @ B.T` for a bitsandbytes 4-bit `base`.

    Computed in the base's compute dtype (bf16), returned in x's dtype, as bitsandbytes
    does. Saves the dropped-out input, its LoRA down-projection and the dropout mask; the
    dequantized weight too with `keep_weight`.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, keep_weight: bool):
        import bitsandbytes.functional as bnbf

        dtype = base.compute_dtype
        weight = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        mask = None
        if p > 0:  # native_dropout is F.dropout's own kernel: the mask peft would draw
            dropped, mask = torch.native_dropout(flat, p, True)
            dropped = dropped.to(dtype)
        else:
            dropped = flat.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        down = dropped @ a.t()
        out = (dropped if mask is None else flat.to(dtype)) @ weight.t()
        out.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, down, mask, a, b, weight if keep_weight else None)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.param_dtypes = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as bnbf

        dropped, down, mask, a, b, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        grad_b = (g.t() @ down).mul_(ctx.scaling)
        g_down = (g @ b).mul_(ctx.scaling)
        grad_a = g_down.t() @ dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                base = ctx.base
                weight = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
            grad_x = g @ weight.to(a.dtype)
            if mask is None:
                grad_x.addmm_(g_down, a)
            else:
                grad_x.add_((g_down @ a).mul_(mask).mul_(1 / (1 - ctx.p)))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        dtype_a, dtype_b = ctx.param_dtypes
        return grad_x, grad_a.to(dtype_a), grad_b.to(dtype_b), None, None, None, None


def _fused_lora_forward(layer, keep_weight: bool, x: torch.Tensor, *args, **kwargs):
    """peft's `Linear4bit.forward` through `_LoraLinear4bit` where it computes the same."""
    names = layer.active_adapters
    plain = (
        len(names) == 1
        and names[0] in layer.lora_A
        and names[0] not in layer.lora_variant
        and not (layer.disable_adapters or layer.merged or args or kwargs)
        and torch.is_autocast_enabled(x.device.type)  # else peft computes LoRA in fp32
    )
    if not plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = names[0]
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    return _LoraLinear4bit.apply(x, a, b, layer.base_layer, scaling, p, keep_weight)


@contextlib.contextmanager
def fused_lora(base: torch.nn.Module, keep_weight: bool) -> Iterator[None]:
    """`fused_lora` (or, keeping the weight, `fused_lora_w`): see the module docstring."""
    from peft.tuners.lora.bnb import Linear4bit

    layers = [m for m in base.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("fused_lora: no LoRA layer on a 4-bit base in this model")
    for layer in layers:
        layer.forward = functools.partial(_fused_lora_forward, layer, keep_weight)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


# Each lever bench/gpu.py measures, by name, as a context manager on the kit's model.
LEVERS: dict[str, Callable[[torch.nn.Module], contextlib.AbstractContextManager]] = {
    "sdpa": functools.partial(attention_backend, impl="sdpa"),
    "no_ckpt": checkpointing_off,
    "bf16_blocks": functools.partial(bf16_activations, residual=False),
    "bf16_residual": functools.partial(bf16_activations, residual=True),
    "fused_lora": functools.partial(fused_lora, keep_weight=False),
    "fused_lora_w": functools.partial(fused_lora, keep_weight=True),
    "keep_attn": attention_output_kept,
    "compile": compiled_blocks,
}


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
