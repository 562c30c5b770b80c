"""The model a recipe trains: the kit's network in k-bit (or full precision) with peft LoRA."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from finetune.recipe import LoraSection, ModelSection
from model import load_model
from model.checkpoint import read_config, resolve_checkpoint


def lora_config(lora: LoraSection) -> LoraConfig:
    """peft's LoraConfig for the recipe's (already checked) section."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Hide transformers 5's FutureWarnings about the `*gradient_checkpointing*` names.

    peft 0.21 still calls them (`prepare_model_for_kbit_training`, `PeftModel.__init__`); the
    warnings are peft's to fix and say nothing about the user's run.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
            category=FutureWarning,
        )
        yield


def _sharded_training() -> bool:
    """FSDP or DeepSpeed launched by accelerate: 4-bit weights must share the compute dtype."""
    return any(
        os.environ.get(flag, "false").lower() == "true"
        for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def build_model(
    section: ModelSection,
    lora: LoraSection,
    *,
    seq_len: int,
    device: torch.device,
    gradient_checkpointing: bool,
    offload_activations: bool = False,
) -> PeftModel:
    """Load the base for training at `seq_len` tokens and wrap it with fresh LoRA adapters.

    The context is raised to `seq_len` when it is longer than the base's. k-bit bases
    go through peft's preparation (norms and embeddings in fp32, input gradients on);
    activation checkpointing uses the non-reentrant form, which works with LoRA on a
    frozen 4-bit base. `offload_activations` (CUDA only) keeps what backward needs, with
    checkpointing each block's input, in host memory (see model/offload.py).
    """
    base_len = read_config(resolve_checkpoint(section.name)).max_seq_len
    model = load_model(
        section.name,
        quantization=section.quantization,
        compute_dtype=section.compute_dtype,
        max_seq_len=max(seq_len, base_len),
        attn_impl=section.attn_impl,
        device=device,
        quant_storage=(section.compute_dtype or "bf16") if _sharded_training() else None,
    )
    checkpointing = {"use_reentrant": False}
    if section.quantization:
        with peft_quietly():
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing,
            )
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model.config.use_cache = False
    if offload_activations:
        model.activation_offloading_enable()
    with peft_quietly():
        return get_peft_model(model, lora_config(lora))
