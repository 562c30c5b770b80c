"""Export for local and served inference: the GGUF file (read back, tensors, refusals, FIM
ids, and against llama.cpp itself when llama-cpp-python is installed), and the merged
folder as serving engines read it (config, AutoTokenizer against SentencePiece)."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from finetune.cli import main
from finetune.export_gguf import ExportError, export_gguf, read_fim
from finetune.gguf_vocab import TENTH, VocabError, gguf_vocab
from finetune.merge import merge
from finetune.run_folder import write_record
from model import load_model
from model.checkpoint import expected_shapes, read_config
from model.random_checkpoint import write_checkpoint
from model.tokenizer import TIE, differing_segments, segmentation_score

ROOT = Path(__file__).resolve().parents[1]
REPO_CODE = sorted(p for d in ("model", "finetune", "data_prep") for p in (ROOT / d).glob("*.py"))
STDLIB = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
TARGETS = ["Wqkv", "out_proj", "up_proj", "down_proj"]
# The real vocabulary: whitespace runs 3-46, <extra_id_0..99> 47-146.
WHITESPACE_IDS, EXTRA_IDS = range(3, 47), range(47, 147)
TRICKY = [
    "def f(x):\n    return x\n",
    "\t\tif x:\r\n\t\t\treturn 1\r\n",
    "\n\n\n\ty\n\n" + " " * 32 + "z",
    "a\x0bb\x0cc\rd\u3000e\u00a0f",
    "name = 'caf\u00e9'  # e\u0301, \ufb01x, \uff46\uff55\uff4c\uff4c, \u2460",
    "print('<|endoftext|>') <extra_id_3> <|pad|>",
    "emoji \U0001f600 and \U0010fffd",  # not in the vocabulary: unk
]
# Runs longer than their longest piece split several ways at the same score.
TIES = ["\n\n\n" + "\t" * 9 + "y", " " * 33 + "z", "x" + " " * 70 + "=" * 40]
# SentencePiece keeps Viterbi sums in float32 and resets them past 1e5, where float32's
# resolution is 2**-7: segmentations scoring closer than this are ties it may settle either way.


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base) -> Path:
    """An adapter trained at 4096 tokens (above the base's 2048), as train leaves it."""
    path = tmp_path_factory.mktemp("run") / "adapter"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(load_model(base), config).save_pretrained(path)
    write_record(path, {"base": str(base), "max_seq_len": 4096, "fim": None})
    return path


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter) -> Path:
    """Merged in fp32, so every exported type is one rounding away from it."""
    out = tmp_path_factory.mktemp("merged") / "model"
    return merge(adapter, out, dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def gguf_f16(tmp_path_factory, merged) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "model-f16.gguf"
    return export_gguf(out, model=merged, progress=False)


@pytest.fixture(scope="module")
def sp(real_tokenizer_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(real_tokenizer_dir / "spiece.model"))


@functools.cache
def read_gguf(path: Path) -> GGUFReader:
    """Each file parsed once (GGUFReader reads the 32768-token vocabulary element by element)."""
    return GGUFReader(path)


def field(path: Path, key: str):
    return read_gguf(path).fields[key].contents()


def gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in read_gguf(path).tensors}


def merged_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def gguf_name(name: str, n_layers: int = 2) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MPT, n_layers).get_name(
        name, try_suffixes=(".weight",)
    )


def test_metadata_reads_back(gguf_f16, merged):
    path = gguf_f16
    config = read_config(merged)
    assert field(path, "general.architecture") == "mpt"
    assert field(path, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    want = {
        "mpt.context_length": 4096,  # the trained context, not the base's 2048
        "mpt.embedding_length": 64,
        "mpt.block_count": 2,
        "mpt.feed_forward_length": 256,
        "mpt.attention.head_count": 4,
        "mpt.attention.max_alibi_bias": 8.0,
    }
    assert {key: field(path, key) for key in want} == want
    assert field(path, "mpt.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert config.max_seq_len == 4096


def test_tensor_names_shapes_and_types(gguf_f16, merged):
    tensors = gguf_tensors(gguf_f16)
    shapes = expected_shapes(read_config(merged))
    assert set(tensors) == {gguf_name(name) for name in shapes}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    for name, shape in shapes.items():
        tensor = tensors[gguf_name(name)]
        assert tuple(tensor.data.shape) == shape, name
        assert tensor.tensor_type == (Q.F32 if len(shape) == 1 else Q.F16), name


@pytest.mark.parametrize("weight_type", ["f16", "bf16", "q8_0"])
def test_tensors_round_trip(merged, gguf_f16, tmp_path, weight_type):
    out = gguf_f16
    if weight_type != "f16":
        out = export_gguf(tmp_path / "m.gguf", model=merged, weight_type=weight_type)
    tensors = gguf_tensors(out)
    for name, weight in merged_weights(merged).items():
        tensor = tensors[gguf_name(name)]
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        if weight.ndim == 1:
            assert torch.equal(got, weight), name
        elif weight_type == "f16":
            assert torch.equal(got, weight.to(torch.float16).float()), name
        elif weight_type == "bf16":
            assert torch.equal(got, weight.to(torch.bfloat16).float()), name
        else:  # q8_0: each block of 32 is scaled to int8 by its largest magnitude
            blocks = weight.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            # Half a step of rounding, plus the step itself stored in float16.
            bound = step * (0.5 + 127 * 2**-11)
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), name


def test_adapter_export_equals_merged_folder_export(adapter, gguf_f16, tmp_path):
    """Merged in memory in f16 (one rounding of the fp32 sum) = the fp32 folder cast to f16."""
    out = export_gguf(tmp_path / "a.gguf", adapter=adapter, progress=False)
    ours, want = gguf_tensors(out), gguf_tensors(gguf_f16)
    assert ours.keys() == want.keys()
    for name in want:
        assert np.array_equal(ours[name].data, want[name].data), name
    assert field(out, "mpt.context_length") == 4096
    assert field(out, "general.name") == adapter.parent.name


def test_vocabulary_types_scores_and_special_ids(gguf_f16, sp):
    path = gguf_f16
    tokens = field(path, "tokenizer.ggml.tokens")
    scores = field(path, "tokenizer.ggml.scores")
    types = field(path, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == sp.get_piece_size() == 32768
    assert tokens == [sp.id_to_piece(i) for i in range(32768)]
    assert field(path, "tokenizer.ggml.model") == "t5"  # llama.cpp's Unigram
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    # Whitespace runs: weighed inside the Viterbi with SentencePiece's user-defined bonus.
    for i in WHITESPACE_IDS:
        assert types[i] == TokenType.NORMAL, tokens[i]
        assert scores[i] == TENTH * (len(tokens[i].encode()) - 1)  # exact in float32
        assert scores[i] == pytest.approx(0.1 * (len(tokens[i].encode()) - 1), abs=1e-4)
    assert all(types[i] == TokenType.USER_DEFINED for i in EXTRA_IDS)
    rest = range(147, 32768)
    assert all(types[i] == TokenType.NORMAL for i in rest)
    assert np.allclose([scores[i] for i in rest], [sp.get_score(i) for i in rest], rtol=0)
    specials = {
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.remove_extra_whitespaces": False,
    }
    assert {key: field(path, key) for key in specials} == specials
    assert "tokenizer.ggml.bos_token_id" not in read_gguf(path).fields
    assert "tokenizer.ggml.fim_pre_token_id" not in read_gguf(path).fields  # no FIM


def test_charsmap_keeps_whitespace_pieces_unnormalized(gguf_f16, real_tokenizer_dir):
    """Exactly the units of tab, newline, CR, VT and FF under the root are cleared."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((real_tokenizer_dir / "spiece.model").read_bytes())
    original = proto.normalizer_spec.precompiled_charsmap
    ours = bytes(field(gguf_f16, "tokenizer.ggml.precompiled_charsmap"))
    assert len(ours) == len(original)
    (size,) = struct.unpack_from("<I", original)
    before = struct.unpack_from(f"<{size // 4}I", original, 4)
    after = struct.unpack_from(f"<{size // 4}I", ours, 4)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    root = (before[0] >> 10) << ((before[0] & (1 << 9)) >> 6)
    assert changed == sorted(root ^ ord(c) for c in "\t\n\r\x0b\x0c")
    assert all(after[i] == 0 for i in changed)
    assert ours[4 + size :] == original[4 + size :]


def test_fim_sentinels_from_replit_ft_json(merged, tmp_path):
    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    fim = {"rate": 0.5, "spm_rate": 0.5, "prefix_id": 47, "suffix_id": 48, "middle_id": 49}
    (folder / "replit_ft.json").write_text(json.dumps({"max_seq_len": 4096, "fim": fim}))
    out = export_gguf(tmp_path / "fim.gguf", model=folder, progress=False)
    got = {k: field(out, f"tokenizer.ggml.fim_{k}_token_id") for k in ("pre", "suf", "mid")}
    assert got == {"pre": 47, "suf": 48, "mid": 49}

    (folder / "replit_ft.json").write_text(json.dumps({"fim": None}))
    assert read_fim(folder, 32768) is None
    (folder / "replit_ft.json").unlink()
    assert read_fim(folder, 32768) is None

    bad_blocks = [({**fim, "middle_id": 40000}, "fim.middle_id"), ({"rate": 0.5}, "fim.prefix_id")]
    for bad, key in bad_blocks:
        (folder / "replit_ft.json").write_text(json.dumps({"fim": bad}))
        with pytest.raises(ExportError, match=f"replit_ft.json: {key}"):
            export_gguf(tmp_path / "bad.gguf", model=folder, progress=False)
    assert not (tmp_path / "bad.gguf").exists()


def test_output_is_atomic_0644_and_not_overwritten(merged, gguf_f16, tmp_path, monkeypatch, capsys):
    assert gguf_f16.stat().st_mode & 0o777 == 0o644
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(out, model=merged, progress=False)
    with pytest.raises(SystemExit, match="replit-ft export: .*exists; refusing"):
        main(["export", "gguf", "--model", str(merged), "--out", str(out)])
    assert out.read_text() == "mine"

    import finetune.export_gguf as export_module

    def fail(name, tensor, tensor_type):
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(export_module, "_encode", fail)
    with pytest.raises(RuntimeError, match="killed halfway"):
        export_gguf(out, model=merged, overwrite=True, progress=False)
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no partial file left
    monkeypatch.undo()
    main(["export", "gguf", "--model", str(merged), "--out", str(out), "--overwrite"])
    assert out.read_bytes() == gguf_f16.read_bytes()
    size = f"({out.stat().st_size / 1e6:.1f} MB, f16)"
    assert capsys.readouterr().out.strip().endswith(f"wrote {out} {size}")


def test_refusals_name_the_problem(merged, adapter, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="either --model .* or --adapter, not both"):
        export_gguf(out, model=merged, adapter=adapter)
    with pytest.raises(ValueError, match="unknown --type 'q4_0'"):
        export_gguf(out, model=merged, weight_type="q4_0")
    with pytest.raises(FileExistsError, match="is a folder"):
        export_gguf(tmp_path, model=merged)
    with pytest.raises(ExportError, match="is a LoRA adapter.*--adapter"):
        export_gguf(out, model=adapter)
    with pytest.raises(SystemExit, match="replit-ft export: .*config.json: missing"):
        main(["export", "gguf", "--model", str(tmp_path), "--out", str(out)])

    folder = tmp_path / "no-vocab"
    shutil.copytree(merged, folder)
    (folder / "spiece.model").unlink()
    with pytest.raises(FileNotFoundError, match="spiece.model: missing"):
        export_gguf(out, model=folder)
    assert not out.exists()


@pytest.mark.parametrize(
    "field_name, value, message",
    [
        ("model_type", sp_pb2.TrainerSpec.BPE, "trainer_spec.model_type is 2"),
        ("byte_fallback", True, "trainer_spec.byte_fallback is True"),
        ("treat_whitespace_as_suffix", True, "trainer_spec.treat_whitespace_as_suffix is True"),
    ],
)
def test_refuses_vocabularies_llama_cpp_cannot_reproduce(
    merged, tmp_path, field_name, value, message
):
    folder = tmp_path / "m"
    shutil.copytree(merged, folder)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((folder / "spiece.model").read_bytes())
    setattr(proto.trainer_spec, field_name, value)
    (folder / "spiece.model").write_bytes(proto.SerializeToString())
    with pytest.raises(VocabError, match=f"spiece.model: {message}"):
        export_gguf(tmp_path / "x.gguf", model=folder)


def test_refuses_weights_it_cannot_write(merged, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(merged, folder)
    weights = merged_weights(folder)
    weights["transformer.blocks.1.ffn.up_proj.weight"][3, 5] = 70000.0  # beyond float16
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="'transformer.blocks.1.ffn.up_proj.weight'.*--type bf16"):
        export_gguf(tmp_path / "x.gguf", model=folder)
    export_gguf(tmp_path / "x.gguf", model=folder, weight_type="bf16", progress=False)
    weights["transformer.norm_f.weight"][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="'transformer.norm_f.weight' holds NaN"):
        export_gguf(tmp_path / "y.gguf", model=folder, weight_type="bf16")


def test_embedding_rows_beyond_the_vocabulary_are_unused_tokens(tmp_path, real_tokenizer_dir):
    vocab = gguf_vocab(real_tokenizer_dir / "spiece.model", 32800)
    assert len(vocab.tokens) == len(vocab.scores) == 32800
    assert vocab.tokens[32768] == b"[PAD32768]"
    assert set(vocab.types[32768:]) == {TokenType.UNUSED}
    small = write_checkpoint(
        tmp_path / "small", n_layers=1, d_model=32, n_heads=2, vocab=1000,
        tokenizer=real_tokenizer_dir,
    )  # fmt: skip
    with pytest.raises(VocabError, match="32768 pieces, but the model's embedding has only 1000"):
        export_gguf(tmp_path / "s.gguf", model=small)


def test_embedding_stored_under_its_tied_alias(merged, gguf_f16, tmp_path):
    """A stock transformers save may hold the tied matrix as lm_head.weight only."""
    folder = tmp_path / "m"
    shutil.copytree(merged, folder)
    weights = merged_weights(folder)
    weights["lm_head.weight"] = weights.pop("transformer.wte.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = export_gguf(tmp_path / "alias.gguf", model=folder, progress=False)
    ours, want = gguf_tensors(out)["token_embd.weight"], gguf_tensors(gguf_f16)["token_embd.weight"]
    assert np.array_equal(ours.data, want.data)


@pytest.fixture(scope="module")
def small_vocab_gguf(tmp_path_factory) -> Path:
    """The offline demo's kind of base: a SentencePiece model trained here (its whitespace
    runs stored with raw spaces, which SentencePiece never matches), 600 pieces."""
    texts = [p.read_text(encoding="utf-8") for p in REPO_CODE]
    path = tmp_path_factory.mktemp("small")
    write_checkpoint(path / "ckpt", n_layers=1, d_model=32, n_heads=2, vocab=600, tokenizer=texts)
    return export_gguf(path / "small.gguf", model=path / "ckpt", progress=False)


def test_small_trained_vocabulary(small_vocab_gguf):
    tokens = field(small_vocab_gguf, "tokenizer.ggml.tokens")
    types = field(small_vocab_gguf, "tokenizer.ggml.token_type")
    assert len(tokens) == 600 and tokens[3] == "  " and types[3] == TokenType.NORMAL
    assert types[tokens.index("\t")] == TokenType.NORMAL


# --- the merged folder as serving engines read it ---


def test_merged_folder_config_for_serving(merged):
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["MptForCausalLM"]  # vLLM registers this name too
    assert "auto_map" not in config
    assert (config["max_seq_len"], config["pad_token_id"], config["eos_token_id"]) == (4096, 2, 1)
    # What vLLM's MPT model asserts or reads.
    assert config["tie_word_embeddings"] and config["no_bias"]
    assert config["embedding_fraction"] == 1.0
    assert config["norm_type"] == "low_precision_layernorm"
    attn = config["attn_config"]
    assert attn["alibi"] and not attn["prefix_lm"] and attn["alibi_bias_max"] == 8
    generation = json.loads((merged / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 2)
    tokenizer_config = json.loads((merged / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 4096
    assert "auto_map" not in tokenizer_config


def assert_same_up_to_ties(ours: list[int], want: list[int], sp) -> int:
    """Equal ids, or where they differ, segmentations of equal score: return the count."""
    differ = differing_segments(ours, want, sp)
    for x, y in differ:
        assert abs(segmentation_score(x, sp) - segmentation_score(y, sp)) < TIE, (
            [sp.id_to_piece(i) for i in x],
            [sp.id_to_piece(i) for i in y],
        )
    return len(differ)


def test_autotokenizer_on_merged_folder_matches_sentencepiece(merged, sp):
    """Plain AutoTokenizer (tokenizer.json, no remote code): SentencePiece's ids, except
    where two segmentations tie within float32 rounding (model/tokenizer.py says why)."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(merged)
    assert (auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (1, 2, 0)
    assert auto.bos_token_id is None and auto.model_max_length == 4096
    for text in TRICKY:
        assert auto(text).input_ids == sp.encode(text), text
    files = [p.read_text(encoding="utf-8") for p in REPO_CODE + STDLIB]
    identical = 0
    for text in TIES + files:
        ids, want = auto(text).input_ids, sp.encode(text)
        identical += ids == want
        assert_same_up_to_ties(ids, want, sp)
        assert auto.decode(ids) == auto.decode(want)
    assert identical >= len(files) // 2


# --- against llama.cpp itself (pip install -e '.[gguf-check]') ---


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def test_llama_cpp_tokenizes_like_sentencepiece(llama_cpp, gguf_f16, sp):
    llm = llama_cpp.Llama(str(gguf_f16), vocab_only=True, verbose=False)
    try:
        for text in TRICKY:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)
        identical = 0
        for text in TIES + [path.read_text(encoding="utf-8") for path in REPO_CODE + STDLIB]:
            ids, want = llm.tokenize(text.encode(), add_bos=False, special=False), sp.encode(text)
            identical += ids == want
            assert_same_up_to_ties(ids, want, sp)
            assert llm.detokenize(ids) == llm.detokenize(want)
        assert identical >= (len(REPO_CODE) + len(STDLIB)) // 2
        assert llm.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [1]
        assert llm.token_eos() == 1 and llm.token_bos() == -1
    finally:
        llm.close()


def test_llama_cpp_tokenizes_a_trained_vocabulary_like_sentencepiece(llama_cpp, small_vocab_gguf):
    sp = spm.SentencePieceProcessor(model_file=str(small_vocab_gguf.parent / "ckpt/spiece.model"))
    llm = llama_cpp.Llama(str(small_vocab_gguf), vocab_only=True, verbose=False)
    try:
        for text in TRICKY + [p.read_text(encoding="utf-8") for p in REPO_CODE[:5]]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)
    finally:
        llm.close()


def test_llama_cpp_logits_match_the_kit(llama_cpp, gguf_f16, merged, sp):
    ids = sp.encode((ROOT / "model" / "modeling.py").read_text())[:300]
    llm = llama_cpp.Llama(
        str(gguf_f16), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False
    )
    try:
        assert llm.n_ctx() == 512 and llm.metadata["mpt.context_length"] == "4096"
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()
    with torch.no_grad():
        ours = load_model(merged)(torch.tensor([ids])).logits[0].float()
    # f16 weights and activations, and ggml's tanh GELU against the exact erf one.
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.98


def test_a_second_export_to_the_same_file_is_refused_and_a_killed_ones_partial_removed(
    merged, tmp_path
):
    from data_prep.files import locked

    out = tmp_path / "m.gguf"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = tmp_path / f".m.gguf.partial-{socket.gethostname()}-{dead.pid}"
    partial.write_bytes(b"half a file")
    with locked(out, on_busy=lambda lock: None):  # an export writing it
        with pytest.raises(FileExistsError, match="another export is writing it"):
            export_gguf(out, model=merged, progress=False)
    assert partial.exists() and not out.exists()
    export_gguf(out, model=merged, progress=False)
    assert out.is_file() and not partial.exists()
