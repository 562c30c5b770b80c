"""bench/levers.py's fused LoRA layer computes what peft + bitsandbytes compute.

The GPU bench times it against peft; here, under bf16 autocast as training runs (on CPU,
and on CUDA where there is one), its loss and every gradient must be peft's up to bf16
rounding, dropout mask included.
"""

from __future__ import annotations

import pytest
import torch

from bench.levers import fused_lora
from finetune.lora import build_model
from finetune.recipe import LoraSection, ModelSection
from model.random_checkpoint import write_checkpoint

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """2 layers, d_model 192, 6 heads; no tokenizer (the GPU machine has none)."""
    path = tmp_path_factory.mktemp("levers")
    return write_checkpoint(path, n_layers=2, d_model=192, n_heads=6, vocab=32768, seed=1)


def qlora(path, dropout: float, device: str):
    section = ModelSection(
        name=str(path), quantization="nf4", compute_dtype="bf16", attn_impl="sdpa"
    )
    lora = LoraSection(
        r=8, alpha=16, dropout=dropout, targets=["Wqkv", "out_proj", "up_proj", "down_proj"]
    )
    model = build_model(
        section, lora, seq_len=128, device=torch.device(device), gradient_checkpointing=True
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at the start would hide every error in the LoRA path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
    model.train()
    return model


def step(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout draws on both sides
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep_weight", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft(checkpoint, dropout, keep_weight, device):
    model = qlora(checkpoint, dropout, device)
    ids = torch.randint(3, 32768, (2, 96), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
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
