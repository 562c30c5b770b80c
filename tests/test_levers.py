"""bench/levers.py's fused LoRA layer computes what peft + bitsandbytes compute.

The GPU bench times it against peft; here, on CPU under bf16 autocast as training runs,
its loss and every gradient must be peft's up to bf16 rounding, dropout mask included.
"""

from __future__ import annotations

import pytest
import torch

from bench.levers import fused_lora
from finetune.lora import build_model
from finetune.recipe import LoraSection, ModelSection


def qlora(path, dropout: float):
    section = ModelSection(
        name=str(path), quantization="nf4", compute_dtype="bf16", attn_impl="sdpa"
    )
    lora = LoraSection(
        r=8, alpha=16, dropout=dropout, targets=["Wqkv", "out_proj", "up_proj", "down_proj"]
    )
    model = build_model(
        section, lora, seq_len=128, device=torch.device("cpu"), gradient_checkpointing=True
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at the start would hide every error in the LoRA path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    return model


def step(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout draws on both sides
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("keep_weight", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft(tiny_checkpoint, dropout, keep_weight):
    model = qlora(tiny_checkpoint, dropout)
    ids = torch.randint(3, 32768, (2, 96), generator=torch.Generator().manual_seed(3))
    want_loss, want = step(model, ids)
    with fused_lora(model.get_base_model(), keep_weight):
        loss, got = step(model, ids)
    _, again = step(model, ids)  # and the model is peft's own again afterwards
    assert abs(loss - want_loss) < 2e-3, (loss, want_loss)
    assert set(got) == set(want) and len(want) == 2 * 4 * 2
    for name, g in want.items():
        assert g.abs().sum() > 0, name
        err = (got[name] - g).norm() / g.norm()
        assert err < 2e-2, f"{name}: relative error {err:.4f}"
        assert torch.equal(again[name], g), name
