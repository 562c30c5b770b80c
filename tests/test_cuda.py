"""The CUDA paths: every backend in bf16 against eager in fp32, cached decoding, QLoRA.

Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
A backend passes when its error against fp32 eager is within 1.5x (plus a little
absolute slack) of eager's own error in bf16: it is then as exact as bf16 allows.
"""

from __future__ import annotations

import pytest
import torch

from model import load_model
from model.attention import BatchLayout, alibi_slopes, eager_attention
from model.random_checkpoint import write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")


def backends() -> list[str]:
    from model.attention import usable_attn_impls

    return [impl for impl in usable_attn_impls(CUDA, torch.bfloat16) if impl != "eager"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """4 layers, d_model 384, 6 heads of 64 (6: the non-power-of-two slope branch)."""
    path = tmp_path_factory.mktemp("cuda_ckpt")
    return write_checkpoint(path, n_layers=4, d_model=384, n_heads=6, vocab=32768, seed=3)


def close_as_bf16(got: torch.Tensor, bf16_eager: torch.Tensor, fp32: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    err, ref_err = (got - fp32).abs(), (bf16_eager - fp32).abs()
    assert err.max() <= 1.5 * ref_err.max() + 1e-2, (err.max(), ref_err.max())
    assert err.mean() <= 1.5 * ref_err.mean() + 1e-4, (err.mean(), ref_err.mean())


@pytest.mark.parametrize("impl", backends())
@pytest.mark.parametrize("case", ["packed", "decode"])
def test_attention_bf16_matches_fp32_eager(impl, case):
    from model.attention import BACKENDS

    heads, dim = 6, 64
    if case == "packed":  # row 0: documents of 300, 500, 224; row 1: 700 tokens, then padding
        pos = torch.cat([torch.arange(n) for n in (300, 500, 224)])
        pos = torch.stack([pos, torch.arange(1024)])
        mask = torch.ones(2, 1024, dtype=torch.long)
        mask[1, 700:] = 0
        q_len, past, valid = 1024, 0, mask.bool()
    else:  # left padding of 37 and 0 tokens, 600 cached keys, 3 new tokens
        pos, mask = None, torch.ones(2, 603, dtype=torch.long)
        mask[0, :37] = 0
        q_len, past, valid = 3, 600, mask[:, 600:].bool()
    layout = BatchLayout.build(
        alibi_slopes(heads).to(CUDA),
        q_len,
        past,
        mask.to(CUDA),
        None if pos is None else pos.to(CUDA),
    )
    gen = torch.Generator(CUDA).manual_seed(0)
    q = torch.randn(2, heads, q_len, dim, device=CUDA, generator=gen)
    k, v = (torch.randn(2, heads, past + q_len, dim, device=CUDA, generator=gen) for _ in range(2))
    scale = dim**-0.5
    fp32 = eager_attention(q, k, v, layout, scale)
    bf = [t.bfloat16() for t in (q, k, v)]
    rows = valid.to(CUDA)[:, None, :, None].expand_as(fp32)
    want = eager_attention(*bf, layout, scale).float()[rows]
    got = BACKENDS[impl](*bf, layout, scale).float()[rows]
    close_as_bf16(got, want, fp32[rows])


@pytest.mark.parametrize("impl", backends())
def test_model_logits_and_gradients_bf16(checkpoint, impl):
    """A packed row through the whole model: logits, loss and input-gradient against eager."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32768, (1, 1536), generator=gen).to(CUDA)
    pos = torch.cat([torch.arange(n) for n in (700, 600, 236)])[None].to(CUDA)
    out = {}
    for name, dtype, attn in [
        ("fp32", "fp32", "eager"),
        ("eager", "bf16", "eager"),
        ("got", "bf16", impl),
    ]:
        model = load_model(checkpoint, compute_dtype=dtype, attn_impl=attn, device=CUDA)
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, position_ids=pos, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        out[name] = (logits, emb.grad.float())
    for i in range(2):
        close_as_bf16(out["got"][i], out["eager"][i], out["fp32"][i])


@pytest.mark.parametrize("impl", backends())
def test_cached_decoding_bf16(checkpoint, impl):
    """Greedy `generate` with the KV cache and left padding: each step's logits against
    eager's full forward over the same tokens."""
    model = load_model(checkpoint, compute_dtype="bf16", attn_impl=impl, device=CUDA)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 32768, (2, 200), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :50], mask[0, :50] = 2, 0
    ids, mask = ids.to(CUDA), mask.to(CUDA)
    seq = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=2,
    )
    steps = torch.stack(seq.logits, 1).float()  # [B, 8, V]: the logits each step saw
    full_mask = torch.cat([mask, torch.ones_like(seq.sequences[:, 200:])], 1)
    full = {}
    for name, dtype in [("fp32", "fp32"), ("bf16", "bf16")]:
        ref = load_model(checkpoint, compute_dtype=dtype, attn_impl="eager", device=CUDA)
        with torch.no_grad():
            out = ref(input_ids=seq.sequences, attention_mask=full_mask, use_cache=False)
        full[name] = out.logits[:, 199:-1].float()
    close_as_bf16(steps, full["bf16"], full["fp32"])


def test_qlora_step_on_cuda(checkpoint):
    """nf4 + LoRA as the recipes build it: a step under bf16 autocast with paged 8-bit AdamW
    reaches every LoRA B and lowers the loss on a repeated batch."""
    import bitsandbytes as bnb

    from finetune.lora import build_model
    from finetune.recipe import LoraSection, ModelSection

    model = build_model(
        ModelSection(name=str(checkpoint), quantization="nf4"),
        LoraSection(dropout=0.0),
        seq_len=4096,
        device=CUDA,
        gradient_checkpointing=True,
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=1e-3)
    ids = torch.randint(3, 32768, (1, 4096), device=CUDA)
    losses = []
    for step in range(4):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if step == 0:
            lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
            assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_flex_long_packed_rows_bf16_match_fp32_eager():
    """Rows of 4096 tokens (32 blocks of 128): documents spanning many blocks, full blocks
    between them, padding; compiled flex with the block mask built from the documents."""
    from model.attention import flex_attention

    heads, dim, n = 4, 64, 4096
    pos = torch.stack(
        [
            torch.cat([torch.arange(m) for m in (1500, 2000, 596)]),
            torch.cat([torch.arange(m) for m in (128, 3072, 896)]),
        ]
    )
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 3500:] = 0
    layout = BatchLayout.build(alibi_slopes(heads).to(CUDA), n, 0, mask.to(CUDA), pos.to(CUDA))
    gen = torch.Generator(CUDA).manual_seed(5)
    q, k, v = (torch.randn(2, heads, n, dim, device=CUDA, generator=gen) for _ in range(3))
    scale = dim**-0.5
    fp32 = eager_attention(q, k, v, layout, scale)
    bf = [t.bfloat16() for t in (q, k, v)]
    rows = mask.bool().to(CUDA)[:, None, :, None].expand_as(fp32)
    want = eager_attention(*bf, layout, scale).float()[rows]
    got = flex_attention(*bf, layout, scale).float()[rows]
    close_as_bf16(got, want, fp32[rows])


def test_offload_round_trip_on_cuda():
    """Page-locked host copies on the side stream; the last one saved is already on its way
    back when the forward ends; every tensor comes back equal, on the device."""
    from model.offload import ActivationOffload

    off = ActivationOffload()
    sent = [torch.randn(1024, 1024, device=CUDA) for _ in range(3)]
    with off.saving():
        packed = [off._pack(t) for t in sent]
    assert all(p.host.is_pinned() for p in packed)
    assert packed[-1].fetched is not None  # prefetched at the end of the forward
    for t, p in zip(reversed(sent), reversed(packed), strict=True):
        back = off._unpack(p)
        assert back.device.type == "cuda" and torch.equal(back, t)
    torch.cuda.synchronize()
    assert off.pool.bytes == 3 * 1024 * 1024 * 4


def test_offloading_keeps_gradients_and_lowers_peak_memory(tmp_path):
    """The QLoRA step with and without `offload_activations`: the same loss and LoRA
    gradients, and a lower peak: the checkpointed block inputs left the GPU."""
    from finetune.lora import build_model
    from finetune.recipe import LoraSection, ModelSection

    path = write_checkpoint(tmp_path, n_layers=8, d_model=256, n_heads=4, vocab=32768, seed=4)
    ids = torch.randint(3, 32768, (1, 16384), device=CUDA)
    out = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = build_model(
            ModelSection(name=str(path), quantization="nf4"),
            LoraSection(dropout=0.0),
            seq_len=16384,
            device=CUDA,
            gradient_checkpointing=True,
            offload_activations=offload,
        ).train()
        for _ in range(2):  # the first step compiles flex and fills the host pool
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.cuda.synchronize()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        sent = model.get_base_model().activation_offload
        out[offload] = (loss.item(), grads, torch.cuda.max_memory_allocated(), sent)
        del model
    (loss0, grads0, peak0, _), (loss1, grads1, peak1, off) = out[False], out[True]
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for name, grad in grads0.items():
        assert torch.allclose(grads1[name], grad, rtol=1e-3, atol=1e-6), name
    block_inputs = 8 * 16384 * 256 * 4  # fp32 residual stream
    assert off.last_bytes >= block_inputs
    assert peak1 < peak0 - 0.4 * block_inputs, (peak0, peak1)
