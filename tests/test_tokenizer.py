"""load_tokenizer against SentencePiece itself, id for id, on real code and on tricky text."""

from __future__ import annotations

import json
import pickle
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizer import ReplitTokenizer, load_tokenizer

STDLIB = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))

TRICKY = [
    "",
    " ",
    "x",
    "def f(x):\n\treturn x\n",
    "\t\tif x:\r\n\t\t\treturn 1\r\n",
    " " * 40 + "x = 1",  # longer than the 32-space piece
    " " * 33 + "\n" + " " * 65,
    "\t" * 9 + "y",
    "\n" * 5 + "\n\n\n",
    "a\x0bb\x0cc\rd",
    "name = 'caf\u00e9'  # e\u0301 is decomposed",
    "\uff46\uff55\uff4c\uff4c\u3000width, \ufb01x, \u2460, \u00bd",  # nfkc changes these
    "print('<|endoftext|>')",
    "<|endoftext|><|pad|><|unk|>",
    "s = '<extra_id_3>' + <extra_id_99>",
    "emoji \U0001f600 and \x00 nul and \U0010fffd",  # not in the vocabulary: unk
    "\u2581\u2581literal lower blocks \u2581",
    "\u65e5\u672c\u8a9e \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0440\u0443\u0441",
    "\ufeffbom and\u200bzero width",
    "\uff76\uff9e \u03d0\u0fb0 a\u0308\u0301",  # multi-character charsmap entries, combining marks
]


@pytest.fixture(scope="module")
def sp(real_tokenizer_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(real_tokenizer_dir / "spiece.model"))


@pytest.fixture(scope="module")
def tok(real_tokenizer_dir) -> ReplitTokenizer:
    return load_tokenizer(real_tokenizer_dir)


@pytest.fixture(scope="module")
def stdlib_texts() -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in STDLIB]


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved")
    tok.save_pretrained(path)
    return path


def test_stdlib_ids_match_sentencepiece(tok, sp, stdlib_texts):
    assert len(stdlib_texts) > 50
    expected = sp.encode(stdlib_texts)
    batch = tok(stdlib_texts, add_special_tokens=False, return_attention_mask=False)
    assert batch["input_ids"] == expected
    for text, ids in list(zip(stdlib_texts, expected, strict=True))[:5]:
        assert tok(text)["input_ids"] == ids
        assert tok.encode(text) == ids


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_text_matches_sentencepiece(tok, sp, text):
    ids = sp.encode(text)
    assert tok.encode(text) == ids
    assert tok(text)["input_ids"] == ids
    assert tok([text, "x"])["input_ids"] == [ids, sp.encode("x")]
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids
    assert tok.decode(ids) == sp.decode(ids)


def test_known_ids(tok):
    """Pinned ids, so a wrong model file cannot pass by agreeing with itself."""
    assert tok.encode(" " * 40 + "x") == [27, 3, 168]  # 8 + 32 spaces, in that order
    assert tok.encode("\t" * 10) == [40, 34]
    assert tok.encode("a\r\nb") == [174, 44, 43, 215]
    assert tok.encode("<extra_id_3>x") == [50, 168]
    assert tok.encode("\U0001f600\U0001f600x") == [0, 168]  # consecutive unknowns merge


def test_special_strings_in_code_stay_text(tok, sp):
    for text in ["x = '<|endoftext|>'", "<|pad|>", "<|unk|>"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert not {1, 2} & set(ids)
        assert tok.decode(ids) == text


def test_special_ids(tok, sp):
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 1)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<|unk|>", 0)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.vocab_size == len(tok) == sp.get_piece_size() == 32768
    assert tok("x = 1")["input_ids"] == sp.encode("x = 1")  # no BOS, no EOS added
    assert tok.convert_ids_to_tokens([1, 33, 50]) == ["<|endoftext|>", "\u2581" * 2, "<extra_id_3>"]


def test_decode_matches_sentencepiece(tok, sp, stdlib_texts):
    for text in stdlib_texts[:20]:
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
    code = "def f(a ,b) :\n    return a  ,  b ;  # don't\n"
    assert tok.decode(tok.encode(code)) == code  # no clean-up of tokenization spaces
    assert tok.decode(tok.encode("x\U0001f600y")) == sp.decode(sp.encode("x\U0001f600y"))
    ids = sp.encode("a") + [1, 2, 0] + sp.encode("b")
    assert tok.decode(ids) == "a<|endoftext|><|pad|> \u2047 b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.batch_decode([ids, sp.encode("c")], skip_special_tokens=True) == ["ab", "c"]


def test_padding_and_truncation(tok, sp):
    batch = tok(["a b c", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [sp.encode("a b c"), sp.encode("a") + [2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]
    assert tok("a b c d", truncation=True, max_length=3)["input_ids"] == sp.encode("a b c d")[:3]


def test_pickle_keeps_ids(tok, sp):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TRICKY[4]) == sp.encode(TRICKY[4])


def test_save_pretrained_reloads_identically(tok, sp, saved, stdlib_texts, real_tokenizer_dir):
    original = (real_tokenizer_dir / "spiece.model").read_bytes()
    assert (saved / "spiece.model").read_bytes() == original
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    assert config["tokenizer_class"] == "TokenizersBackend"
    again = load_tokenizer(saved)
    assert isinstance(again, ReplitTokenizer)
    texts = stdlib_texts[:30] + TRICKY
    assert again(texts)["input_ids"] == sp.encode(texts)
    assert (again.eos_token_id, again.pad_token_id, again.unk_token_id) == (1, 2, 0)


def test_autotokenizer_reload_is_close(sp, saved, stdlib_texts):
    """Plain AutoTokenizer gets the Rust approximation (tokenizer.json): same special
    tokens and decoding, ids equal on ordinary code, about 0.1% of tokens off on long files
    (see model/tokenizer.py for why it cannot be exact)."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(saved)
    assert type(auto).__name__ == "TokenizersBackend"
    assert (auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (1, 2, 0)
    assert auto.bos_token_id is None
    for text in ["x = '<|endoftext|>'\n", "def f(x):\n\treturn x\r\n", "<extra_id_3>"]:
        assert auto.encode(text) == sp.encode(text)
        assert auto.decode(auto.encode(text)) == text
    lines = [line for text in stdlib_texts[:10] for line in text.splitlines(keepends=True)]
    expected = sp.encode(lines)
    got = auto(lines, return_attention_mask=False)["input_ids"]
    same = sum(a == b for a, b in zip(got, expected, strict=True))
    assert same / len(lines) > 0.999


def test_missing_model_raises(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "spiece.model")):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_tokenizer(tmp_path / "no_such_folder")


CODE_CHARS = st.sampled_from([*" \t\n\r\x0b\x0c_=():,.'\"#<|>/\\", "<|endoftext|>", "<extra_id_0>"])
# Characters nmt_nfkc rewrites, alone or combined with what follows.
NFKC_CHARS = st.sampled_from(
    [*"\uff76\uff9e\uff9f\u03d0\u0fb0\u0301\u0308\u3099\ufb01\u2460\u3000\u00a0"]
)
TEXT = st.lists(
    CODE_CHARS | NFKC_CHARS | st.characters(exclude_categories=("Cs",)), max_size=60
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=TEXT)
def test_random_text_matches_sentencepiece(tok, sp, text):
    ids = sp.encode(text)
    assert tok.encode(text) == ids
    assert tok.decode(ids) == sp.decode(ids)
