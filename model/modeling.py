"""The replit-code-v1-3b network: MPT with ALiBi, written for current transformers.

transformers' own `MptForCausalLM` loads these weights but has eager attention only,
ignores `position_ids` (packed documents see each other) and stops at `max_seq_len`;
the published remote code no longer runs. This module keeps the checkpoint's
parameter names exactly (`transformer.blocks.{i}.attn.Wqkv`, `ffn.up_proj`, ...) so
bitsandbytes, peft and `save_pretrained` work on it as on any transformers model.

Batches: right padding through `attention_mask` for training, left padding for
batched generation; packed rows mark each document's start by `position_ids`
restarting at 0. See `model.attention` for the attention backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationMixin, MptConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.attention import BACKENDS, BatchLayout, alibi_slopes
from model.offload import ActivationOffload

# Tokens per chunk of fp32 logits in the loss: 512 x 32768 x 4 B = 64 MB, while a 512-row
# matmul still runs at full speed on CPU and GPU.
LOSS_CHUNK_TOKENS = 512
# Tokens per chunk of a block's per-token half (norm_2, FFN, their LoRA) in batches longer
# than this: each chunk's 4x-wide intermediates (L x 10240 each: up_proj's output, GELU's,
# their LoRA and dtype copies) live only while that chunk runs. Batches up to this size
# (every figure measured before it existed) run in one piece.
PER_TOKEN_CHUNK = 65536


class Attention(nn.Module):
    """Fused q|k|v projection, ALiBi attention through the selected backend, output projection."""

    def __init__(self, config: MptConfig, layer_idx: int):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.scale = config.attn_config.softmax_scale or self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, attn_impl: str, cache: Cache | None
    ) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.Wqkv(x).view(batch, length, 3, self.n_heads, self.head_dim)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Under autocast norm_1's output is fp32 and a 4-bit Wqkv returns its input's
            # dtype, so q, k, v would arrive in fp32: sdpa casts them itself, but flash-attn
            # refuses them and flex, in torch versions without its own autocast rule, runs
            # its fp32 kernels.
            qkv = qkv.to(torch.get_autocast_dtype(device))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = BACKENDS[attn_impl](q, k, v, layout, self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        hidden = config.expansion_ratio * config.d_model
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class LayerNorm(nn.LayerNorm):
    """Weight-only LayerNorm that follows the activations' dtype.

    peft's k-bit preparation upcasts norms to fp32 while activations may stay bf16;
    casting the weight keeps the two in step instead of failing on mixed dtypes.
    """

    def __init__(self, width: int, eps: float):
        super().__init__(width, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), None, self.eps)


class ReplitBlock(GradientCheckpointingLayer):
    """Pre-norm block: `x += attn(norm_1(x)); x += ffn(norm_2(x))`."""

    def __init__(self, config: MptConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.norm_2 = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = FeedForward(config)

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, attn_impl: str, cache: Cache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), layout, attn_impl, cache)
        return per_token_chunks(self._mlp, x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm_2(x))


def per_token_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` for a token-wise `fn`, in chunks of PER_TOKEN_CHUNK tokens when x has more.

    With gradients each chunk is its own (non-reentrant, nestable) checkpoint: only its
    input is kept, and its intermediates are recomputed and freed one chunk at a time in
    backward, for one more forward of `fn` (by FLOPs about 2% of a 131072-token step, whose
    time goes to attention; estimated, not measured).
    """
    batch, length, width = x.shape
    tokens = batch * length
    if tokens <= PER_TOKEN_CHUNK:
        return fn(x)
    flat = x.reshape(tokens, width)
    grad = torch.is_grad_enabled()
    parts = [
        checkpoint(fn, part, use_reentrant=False) if grad else fn(part)
        for part in flat.split(PER_TOKEN_CHUNK)
    ]
    return torch.cat(parts).view(batch, length, -1)


class Transformer(nn.Module):
    """Embedding, blocks and final norm, under the checkpoint's `transformer.` prefix."""

    def __init__(self, config: MptConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ReplitBlock(config, i) for i in range(config.n_layers))
        self.norm_f = LayerNorm(config.d_model, config.layer_norm_epsilon)


class ReplitForCausalLM(PreTrainedModel, GenerationMixin):
    """MPT causal LM with ALiBi; logits are `norm_f(x) @ wte.weight.T` (tied, no lm_head tensor).

    `attn_impl` selects the attention backend (`eager`, `sdpa`, `flash`, `flex`); use
    `model.load_model`, which resolves `auto` for the device, rather than setting it here.
    """

    config_class = MptConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReplitBlock"]

    def __init__(self, config: MptConfig):
        super().__init__(config)
        self.transformer = Transformer(config)
        self.attn_impl = "sdpa"
        self.activation_offload: ActivationOffload | None = None
        self.post_init()

    def activation_offloading_enable(self) -> None:
        """Keep what backward needs in host memory during forwards with gradients.

        With activation checkpointing that is each block's input: the GPU then holds about
        one block's activations instead of one input per block, for copies that overlap
        compute. Meant for CUDA; on CPU it only copies.
        """
        self.activation_offload = ActivationOffload()

    def activation_offloading_disable(self) -> None:
        self.activation_offload = None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_config.get("init_std", 0.02))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits, or with `labels` the shifted cross-entropy (-100 ignored) and no logits.

        The loss is the mean over labelled tokens, or their sum divided by
        `num_items_in_batch` when given (token-level normalisation across micro-batches).
        Logits for the whole batch are never held in fp32 at once: see `lm_loss`.
        """
        cache = kwargs.pop("past_key_values", cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        total = past_len + x.shape[1]
        if total > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {total} tokens is longer than max_seq_len={self.config.max_seq_len}; "
                "ALiBi extrapolates: raise it with load_model(..., max_seq_len=N)"
            )
        slopes = alibi_slopes(self.config.n_heads, self.config.attn_config.alibi_bias_max)
        layout = BatchLayout.build(
            slopes.to(x.device), x.shape[1], past_len, attention_mask, position_ids
        )
        offload = self.activation_offload if torch.is_grad_enabled() else None
        with offload.saving() if offload else contextlib.nullcontext():
            for block in self.transformer.blocks:
                x = block(x, layout, self.attn_impl, cache if use_cache else None)
            x = self.transformer.norm_f(x)
            if labels is not None:
                loss = lm_loss(x, self.transformer.wte.weight, labels, num_items_in_batch)
        if labels is not None:
            return CausalLMOutputWithPast(loss=loss, cache=cache if use_cache else None)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.transformer.wte.weight)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted cross-entropy over labelled tokens, computed in chunks of fp32 logits.

    Only positions with a label are projected at all; see `_ChunkedLinearCrossEntropy`.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    picked = hidden[:, :-1][keep]
    total = _ChunkedLinearCrossEntropy.apply(picked, weight, targets[keep])
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk.

    A 2048-token row has 2048 x 32768 logits (256 MB in fp32); autograd would keep
    them, and their softmax, until backward. Here each chunk's gradient is computed
    right after its loss, in the forward pass, and only the gradients of `hidden`
    (and of `weight`, when it trains) are kept: peak memory is one chunk of logits.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            h = hidden[s : s + LOSS_CHUNK_TOKENS]
            t = targets[s : s + LOSS_CHUNK_TOKENS]
            logits = F.linear(h, weight).float()
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                dlogits = logits.sub_(lse[:, None]).exp_()
                dlogits[torch.arange(t.shape[0], device=t.device), t] -= 1
                if need_h:
                    grad_h[s : s + LOSS_CHUNK_TOKENS] = dlogits.to(weight.dtype) @ weight
                if need_w:
                    grad_w += dlogits.t() @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None,
            None,
        )
