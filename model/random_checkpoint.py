"""Write small (or full-size random) checkpoints in exactly the published layout.

The real weights cannot be downloaded where the kit is tested, so tests, benchmarks
and the offline demo load checkpoints written here: replit-code-v1-3b's config with
other dimensions, random fp32 weights in one `pytorch_model.bin`, and tokenizer files
(the real `spiece.model` when given, or a small SentencePiece model trained on text).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import MptConfig

from model.checkpoint import expected_shapes

SPECIAL_TOKENS = {"unk_token": "<|unk|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
# The user-defined pieces of the real vocabulary, in its order (ids 3-146): whitespace runs,
# then <extra_id_0>..<extra_id_99> (47-146), which fill-in-the-middle uses as sentinels.
USER_DEFINED_PIECES = (
    [" " * n for n in range(2, 33)]
    + ["\t" * n for n in range(1, 9)]
    + ["\n\n", "\n", "\r", "\x0b", "\x0c"]
    + [f"<extra_id_{i}>" for i in range(100)]
)


def replit_config(*, n_layers: int, d_model: int, n_heads: int, vocab: int) -> MptConfig:
    """replit-code-v1-3b's config.json with other dimensions (the real one: 32, 2560, 32, 32768)."""
    return MptConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        expansion_ratio=4,
        max_seq_len=2048,
        vocab_size=vocab,
        no_bias=True,
        norm_type="low_precision_layernorm",
        learned_pos_emb=True,
        logit_scale=None,
        emb_pdrop=0,
        resid_pdrop=0,
        embedding_fraction=1.0,
        use_cache=True,
        eos_token_id=1,
        attn_config={
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_impl": "torch",
            "attn_pdrop": 0,
            "attn_type": "multihead_attention",
            "attn_uses_sequence_id": False,
            "clip_qkv": None,
            "prefix_lm": False,
            "qk_ln": False,
            "softmax_scale": None,
        },
        init_config={"name": "kaiming_normal_", "init_std": 0.02},
    )


def write_checkpoint(
    path: str | os.PathLike,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    vocab: int = 32768,
    tokenizer: str | os.PathLike | Iterable[str] | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """Write a random checkpoint in the published layout to `path` and return it.

    tokenizer: a directory or file holding the real `spiece.model` (copied with its
    JSON files), or texts to train a small SentencePiece model of `vocab` pieces on,
    or None for no tokenizer files. Weights are N(0, std), norms 1, fp32, generated
    tensor by tensor from `seed`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        _write_tokenizer(path, tokenizer, vocab)
    config = replit_config(n_layers=n_layers, d_model=d_model, n_heads=n_heads, vocab=vocab)
    config.architectures = ["MPTForCausalLM"]
    config.to_json_file(path / "config.json")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}, indent=2))

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=gen).mul_(std)
    torch.save(state, path / "pytorch_model.bin")
    return path


def _write_tokenizer(path: Path, source: str | os.PathLike | Iterable[str], vocab: int) -> None:
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        model_file = src / "spiece.model" if src.is_dir() else src
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: no spiece.model to copy")
        shutil.copy(model_file, path / "spiece.model")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (model_file.parent / name).is_file():
                shutil.copy(model_file.parent / name, path / name)
    else:
        (path / "spiece.model").write_bytes(train_sentencepiece(source, vocab))
    if not (path / "special_tokens_map.json").exists():
        (path / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    if not (path / "tokenizer_config.json").exists():
        config = {**SPECIAL_TOKENS, "bos_token": None, "clean_up_tokenization_spaces": False}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def train_sentencepiece(texts: Iterable[str], vocab: int) -> bytes:
    """A small unigram SentencePiece model set up like the real one (specials, whitespace)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        model_type="unigram",
        vocab_size=vocab,
        unk_id=0,
        eos_id=1,
        pad_id=2,
        bos_id=-1,
        unk_piece="<|unk|>",
        eos_piece="<|endoftext|>",
        pad_piece="<|pad|>",
        user_defined_symbols=USER_DEFINED_PIECES,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        byte_fallback=False,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return out.getvalue()
