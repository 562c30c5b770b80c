"""Activation offloading and the per-token chunks of long batches, on CPU.

On CPU the offloaded tensors are copied to other host buffers and back, through the same
bookkeeping as on CUDA without the streams and page-locking (tests/test_cuda.py has those).
"""

from __future__ import annotations

import pytest
import torch

from finetune.lora import build_model
from finetune.recipe import LoraSection, ModelSection
from model import modeling, offload
from model.offload import ActivationOffload
from model.random_checkpoint import write_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload_base")
    return write_checkpoint(path, n_layers=3, d_model=64, n_heads=4, vocab=4096, std=0.1)


def qlora(base, checkpointing: bool = True):
    """nf4 + LoRA on every projection, as the trainer builds it; the same LoRA draws each time."""
    torch.manual_seed(0)
    lora = LoraSection(dropout=0.0, targets=["Wqkv", "out_proj", "up_proj", "down_proj"])
    model = build_model(
        ModelSection(name=str(base), quantization="nf4", compute_dtype="fp32"),
        lora,
        seq_len=256,
        device=CPU,
        gradient_checkpointing=checkpointing,
    )
    for name, p in model.named_parameters():  # LoRA B starts at 0: make gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def step(model, ids, pos):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def batch(rows: int = 2, length: int = 96):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 4096, (rows, length), generator=gen)
    pos = torch.cat([torch.arange(40), torch.arange(length - 40)]).repeat(rows, 1)
    return ids, pos


def test_round_trip_gives_back_what_went_out():
    off = ActivationOffload()
    big = torch.randn(512, 1024)  # 2 MiB
    odd = torch.randn(1024, 600).t()  # not contiguous
    with off.saving():
        packed = [off._pack(t) for t in (big, odd)]
        small = torch.randn(16)
        weight = torch.nn.Parameter(torch.randn(1024, 1024))
        assert off._pack(small) is small and off._pack(weight) is weight
    assert off.last_bytes == big.numel() * 4 + odd.numel() * 4
    for went, saved in zip((big, odd), packed, strict=True):
        assert saved.host.data_ptr() != went.data_ptr()
        back = off._unpack(saved)
        assert back.shape == went.shape and torch.equal(back, went)
        assert back.data_ptr() != saved.host.data_ptr()  # a copy: the host buffer gets reused


def test_host_buffers_are_reused_by_the_next_step():
    off = ActivationOffload()
    x = torch.randn(512, 1024, requires_grad=True)
    for _ in range(3):
        with off.saving():
            y = (x.exp() * 2).sum()  # exp saves its 2 MiB output
        y.backward()
    assert off.pool.bytes == 512 * 1024 * 4


def test_offloading_leaves_loss_and_gradients_unchanged(base, monkeypatch):
    """A QLoRA step with checkpointing: every block's input goes out and comes back."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1024)
    ids, pos = batch()
    model = qlora(base)
    want = step(model, ids, pos)
    inner = model.get_base_model()
    inner.activation_offloading_enable()
    for _ in range(2):  # the second step reuses the first one's host buffers
        got = step(model, ids, pos)
        assert torch.equal(got[0], want[0])
        for name, grad in want[1].items():
            assert torch.equal(got[1][name], grad), name
    block_inputs = 3 * ids.numel() * 64 * 4  # 3 blocks, fp32 residual stream
    assert inner.activation_offload.last_bytes >= block_inputs
    assert inner.activation_offload.pool.bytes == inner.activation_offload.last_bytes
    with torch.no_grad():  # evaluation saves nothing and offloads nothing
        inner.activation_offload.last_bytes = 0
        model(input_ids=ids, position_ids=pos, labels=ids)
    assert inner.activation_offload.last_bytes == 0


@pytest.mark.parametrize("checkpointing", [True, False])
def test_per_token_chunks_leave_loss_and_gradients_unchanged(base, monkeypatch, checkpointing):
    """2 x 96 tokens in chunks of 40 (the last one short) against one piece."""
    ids, pos = batch()
    model = qlora(base, checkpointing)
    want = step(model, ids, pos)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos).logits
    monkeypatch.setattr(modeling, "PER_TOKEN_CHUNK", 40)
    calls = []
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: calls.append(1) or ckpt(*a, **k))
    got = step(model, ids, pos)
    assert calls  # the chunks did run as checkpoints
    assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    for name, grad in want[1].items():
        assert torch.allclose(got[1][name], grad, rtol=1e-4, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, position_ids=pos).logits, logits, atol=1e-5)


def ckpt(*args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(*args, **kwargs)


def test_offloading_on_cpu_is_refused_naming_the_key(tmp_path, base):
    from finetune.recipe import RecipeError, load_recipe
    from finetune.train import train

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: {base}, compute_dtype: fp32}}\n"
        f"data: {{code: [{tmp_path}], seq_len: 128}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}, offload_activations: true}}\n"
    )
    with pytest.raises(RecipeError, match="train.offload_activations=true .* on cpu"):
        train(load_recipe(recipe))
    assert not (tmp_path / "run").exists()
