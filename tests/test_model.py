"""The network against transformers' MptForCausalLM, and its padding, packing and cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, MptForCausalLM
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from model import load_model
from model.attention import alibi_slopes
from model.modeling import lm_loss

CPU_IMPLS = ["eager", "sdpa", "flex"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return MptForCausalLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    return load_model(tiny_checkpoint, attn_impl="eager")


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 32768, (batch, length))


@pytest.mark.parametrize("n_heads", [6, 12, 32])
def test_slopes_match_mpt(n_heads):
    hf = build_mpt_alibi_tensor(n_heads, 2)  # [H, 1, 2]: slope * (j - 1)
    assert torch.equal(alibi_slopes(n_heads), -hf[:, 0, 0])
    if n_heads == 32:
        assert torch.allclose(alibi_slopes(32), 2.0 ** (-torch.arange(1, 33) / 4))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_logits_match_transformers_with_right_padding(ours, reference, impl):
    ids = tokens(3, 37)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 9:] = 0
    ours.attn_impl = impl
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    for row, n in enumerate([37, 25, 9]):
        assert (got[row, :n] - want[row, :n]).abs().max() <= 1e-5
    assert torch.isfinite(got).all()


def test_loss_matches_transformers(ours, reference):
    ids = tokens(2, 30)
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        want = reference(ids, labels=labels).loss
        got = ours(ids, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5


def test_chunked_loss_and_gradients_match_plain_cross_entropy(monkeypatch):
    monkeypatch.setattr("model.modeling.LOSS_CHUNK_TOKENS", 7)
    hidden = torch.randn(2, 20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 20))
    labels[0, 3:9] = -100
    loss = lm_loss(hidden, weight, labels)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden[:, :-1] @ weight.T
    want = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5)
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], weight.grad, atol=1e-6)
    summed = lm_loss(hidden, weight, labels, num_items_in_batch=100)
    assert torch.allclose(summed * 100, want * (labels[:, 1:] != -100).sum(), atol=1e-3)


def test_kv_cache_token_by_token_matches_transformers(ours, reference):
    ids = tokens(1, 24)
    with torch.no_grad():
        want = reference(ids).logits
        for impl in CPU_IMPLS:
            ours.attn_impl = impl
            cache = DynamicCache(config=ours.config)
            steps = [ours(ids[:, :5], cache=cache, use_cache=True).logits]
            for t in range(5, 24):
                steps.append(ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            got = torch.cat(steps, dim=1)
            assert (got - want).abs().max() <= 1e-5, impl


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_packed_row_equals_documents_one_by_one(ours, impl):
    lengths = [[7, 12, 5, 6], [20, 3]]  # second row: two documents, then 7 padding tokens
    docs = [[tokens(1, n) for n in row] for row in lengths]
    width = 30
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, row in enumerate(docs):
        at = 0
        for doc in row:
            n = doc.shape[1]
            ids[r, at : at + n], pos[r, at : at + n], mask[r, at : at + n] = doc, torch.arange(n), 1
            at += n
    ours.attn_impl = impl
    with torch.no_grad():
        packed = ours(ids, attention_mask=mask, position_ids=pos).logits
        for r, row in enumerate(docs):
            at = 0
            for doc in row:
                alone = ours(doc).logits[0]
                assert (packed[r, at : at + doc.shape[1]] - alone).abs().max() <= 1e-5
                at += doc.shape[1]


def test_documents_do_not_leak_into_each_other(ours):
    """Changing the first document of a packed row leaves the second one's logits untouched."""
    ids = tokens(1, 20)
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    other = ids.clone()
    other[0, :8] = tokens(1, 8)
    ours.attn_impl = "sdpa"
    with torch.no_grad():
        a = ours(ids, position_ids=pos).logits[0, 8:]
        b = ours(other, position_ids=pos).logits[0, 8:]
        c = ours(other).logits[0, 8:]
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() > 1e-3


def test_backends_agree_on_gradients(tiny_checkpoint):
    grads = {}
    ids = tokens(2, 33)
    pos = torch.cat([torch.arange(13), torch.arange(20)]).repeat(2, 1)
    for impl in ["eager", "sdpa"]:
        model = load_model(tiny_checkpoint, attn_impl=impl).train()
        model(ids, position_ids=pos, labels=ids).loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["eager"].items():
        assert torch.allclose(g, grads["sdpa"][name], atol=1e-6, rtol=1e-4), name


def test_context_can_be_raised_past_max_seq_len(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    with pytest.raises(ValueError, match="max_seq_len=2048"):
        model(tokens(1, 2049))
    longer = load_model(tiny_checkpoint, max_seq_len=4096)
    assert longer.config.max_seq_len == 4096
    with torch.no_grad():
        assert torch.isfinite(longer(tokens(1, 2500), logits_to_keep=1).logits).all()


def test_batched_left_padded_generation_equals_one_by_one(ours):
    prompts = [tokens(1, n)[0] for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), 2)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    ours.attn_impl = "sdpa"
    ours.generation_config.pad_token_id = 2
    batched = ours.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None
    )
    for r, p in enumerate(prompts):
        alone = ours.generate(p[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[r, width:], alone[0, len(p) :])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_gets_the_autocast_dtype_from_a_4bit_base(tiny_checkpoint, monkeypatch, impl):
    """QLoRA under bf16 autocast: norm_1 gives fp32 and a 4-bit Wqkv returns its input's
    dtype, yet every backend must get bf16 q, k, v (flash-attn refuses fp32; flex without
    an autocast rule would run fp32 kernels)."""
    from finetune.lora import build_model
    from finetune.recipe import LoraSection, ModelSection
    from model import modeling

    model = build_model(
        ModelSection(name=str(tiny_checkpoint), quantization="nf4", attn_impl=impl),
        LoraSection(r=4, alpha=8),
        seq_len=64,
        device=torch.device("cpu"),
        gradient_checkpointing=True,
    ).train()
    seen = []
    backend = modeling.BACKENDS[impl]

    def spy(q, k, v, layout, scale):
        seen.append({q.dtype, k.dtype, v.dtype})
        return backend(q, k, v, layout, scale)

    monkeypatch.setitem(modeling.BACKENDS, impl, spy)
    ids = tokens(1, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen), seen
    assert torch.isfinite(loss)
