"""Fill-in-the-middle data: layouts that reassemble to their source, sentinels only from the
transform, both orders, seeded, recorded in the manifest; rate 0 changes nothing."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import fim as fim_module
from data_prep.document import Document
from data_prep.fim import FimSettings, document_rng, fim_pieces
from data_prep.prepare import PrepConfig, prepare
from data_prep.tokens import encode_documents, encode_texts, token_offsets
from finetune.cli import main as cli
from model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PRE, SUF, MID, EOS = 47, 48, 49, 1
LITERAL = 'tag = "<extra_id_0>"  # and ＜extra_id_1＞<extra_id_2><extra_id_2> <extra_id_7>\n'


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer_dir):
    return load_tokenizer(real_tokenizer_dir)


@pytest.fixture(scope="module")
def documents(tokenizer) -> list[Document]:
    """This repository's own code, a file of literal sentinel text, one of non-ASCII text
    and one that nmt_nfkc changes (full-width letters, SentencePiece's own "▁")."""
    files = sorted((ROOT / "data_prep").glob("*.py")) + sorted((ROOT / "finetune").glob("*.py"))
    docs = [Document(str(f.relative_to(ROOT)), f.read_text()) for f in files]
    literal = LITERAL.replace("＜extra_id_1＞", "<extra_id_1>") * 40
    docs.append(Document("literal.py", literal))
    docs.append(Document("unicode.py", "s = 'héllo wörld, 日本語 → ünïcode'\n" * 30))
    docs.append(Document("wide.py", "x = 'ＡＢＣ'  # ▁ and ＜extra_id_2＞\n" * 40))
    return docs


def decoded(tokenizer, text: str) -> str:
    """The text as the tokenizer gives it back: the text itself, unless nmt_nfkc changed it."""
    sp = tokenizer.sp_model
    return sp.decode(encode_texts(sp, [text], {PRE, SUF, MID})[0])


def pieces_of(tokenizer, docs, fim: FimSettings, seq_len: int, seed: int = 0):
    encoded = encode_documents(tokenizer, docs, progress=False, reserved=fim.sentinel_ids)
    return [
        fim_pieces(tokenizer, d.completion, ids, fim, seq_len, document_rng(seed, d.name))
        for d, (ids, _) in zip(docs, encoded, strict=True)
    ]


def parse(tokenizer, ids: list[int]) -> tuple[str, str]:
    """(layout, text in source order) of one piece: 'psm', 'spm' or 'plain'."""
    decode = tokenizer.decode
    if ids[0] != PRE:
        assert not {PRE, SUF, MID} & set(ids)
        return "plain", decode([i for i in ids if i != EOS])
    assert [ids.count(s) for s in (PRE, SUF, MID, EOS)] == [1, 1, 1, 1] and ids[-1] == EOS
    suf, mid = ids.index(SUF), ids.index(MID)
    assert suf < mid
    if suf == 1:  # SPM: <pre> <suf> S <mid> P M <eos>
        return "spm", decode(ids[mid + 1 : -1]) + decode(ids[2:mid])
    # PSM: <pre> P <suf> S <mid> M <eos>
    return "psm", decode(ids[1:suf]) + decode(ids[mid + 1 : -1]) + decode(ids[suf + 1 : mid])


def test_every_fim_document_reassembles_to_its_source(tokenizer, documents):
    fim = FimSettings.for_tokenizer(tokenizer, 1.0, 0.5)
    assert (fim.prefix_id, fim.suffix_id, fim.middle_id) == (PRE, SUF, MID)
    seq_len = 128
    layouts = Counter()
    exact = 0
    for doc, pieces in zip(documents, pieces_of(tokenizer, documents, fim, seq_len), strict=True):
        text = ""
        for piece in pieces:
            assert len(piece.ids) <= seq_len and piece.trained.all()
            kind, part = parse(tokenizer, piece.ids.tolist())
            layouts[kind] += 1
            text += part
        assert text == decoded(tokenizer, doc.completion), doc.name
        exact += text == doc.completion
        assert pieces[-1].ids[-1] == EOS
    assert exact > 0.8 * len(documents)  # most decode to their source exactly; not wide.py
    assert decoded(tokenizer, documents[-1].completion) != documents[-1].completion
    n = layouts["psm"] + layouts["spm"]
    assert n > 200 and layouts["plain"] == 0  # rate 1: every chunk, none too long
    assert 0.4 < layouts["spm"] / n < 0.6
    assert len(documents) > 15 and sum(1 for d in documents if len(d.completion) > 1000) > 10


def test_rate_and_spm_rate_choose_chunks(tokenizer, documents):
    fim = FimSettings.for_tokenizer(tokenizer, 0.3, 1.0)
    layouts = Counter(
        parse(tokenizer, p.ids.tolist())[0]
        for pieces in pieces_of(tokenizer, documents, fim, 128)
        for p in pieces
    )
    assert set(layouts) == {"plain", "spm"}
    assert 0.2 < layouts["spm"] / layouts.total() < 0.4


def test_a_layout_that_does_not_fit_stays_left_to_right(tokenizer, documents, monkeypatch):
    """With no slack, chunks fill the row and cutting them in three often adds a token."""
    monkeypatch.setattr(fim_module, "OVERHEAD", 4)
    fim = FimSettings.for_tokenizer(tokenizer, 1.0, 0.5)
    layouts = Counter()
    for doc, pieces in zip(documents, pieces_of(tokenizer, documents, fim, 64), strict=True):
        parts = [parse(tokenizer, p.ids.tolist()) for p in pieces]
        assert all(len(p.ids) <= 64 for p in pieces)
        assert "".join(text for _, text in parts) == decoded(tokenizer, doc.completion)
        layouts.update(kind for kind, _ in parts)
    assert layouts["plain"] > 0 and layouts["psm"] > 0 and layouts["spm"] > 0


def test_literal_sentinel_text_stays_text(tokenizer):
    sp = tokenizer.sp_model
    assert PRE in sp.encode(LITERAL) and 54 in sp.encode(LITERAL)  # what SentencePiece does
    ids = encode_texts(sp, [LITERAL], {PRE, SUF, MID})[0]
    assert not {PRE, SUF, MID} & set(ids) and 54 in ids  # <extra_id_7> is not reserved
    assert sp.decode(ids) == LITERAL.replace("＜extra_id_1＞", "<extra_id_1>")  # nmt_nfkc's
    offsets = token_offsets(sp, LITERAL, {PRE, SUF, MID})
    assert [i for i, _ in offsets] == ids
    data = LITERAL.encode()
    assert offsets[0][1] == 0 and all(a < b for (_, a), (_, b) in itertools.pairwise(offsets))
    begins = [at for _, at in offsets]
    for sentinel in ("<extra_id_0>", "＜extra_id_1＞"):  # cut after the first character
        at = data.index(sentinel.encode())
        assert at + len(sentinel[0].encode()) in begins
    assert encode_texts(sp, [LITERAL, "x"]) == sp.encode([LITERAL, "x"])  # nothing reserved


def test_a_tokenizer_without_sentinels_is_refused(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["def f(x):\n    return x\n"] * 50),
        model_writer=model,
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"has no user-defined piece <extra_id_0>"):
        FimSettings.for_tokenizer(load_tokenizer(tmp_path), 0.5, 0.5)


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    for f in sorted((ROOT / "data_prep").glob("*.py")):
        (repo / "pkg" / f.name).write_text(f.read_text())
    (repo / "pkg" / "literal.py").write_text(LITERAL * 4)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    jsonl = tmp_path / "instr.jsonl"
    record = {"instruction": "Tag <extra_id_0> it.", "input": "", "output": "x = 1"}
    jsonl.write_text(json.dumps(record) + "\n")
    return repo, jsonl


def config(tmp_path, sources, tokenizer_dir, out: str = "out", **kw) -> PrepConfig:
    repo, jsonl = sources
    settings = dict(
        out=str(tmp_path / out),
        tokenizer=str(tokenizer_dir),
        seq_len=256,
        code=[str(repo)],
        instructions=[str(jsonl)],
        validation_fraction=0.2,
    )
    return PrepConfig(**(settings | kw))


def rows(result) -> dict[str, dict]:
    return {split: data.to_dict() for split, data in result.load().items()}


def runs(row_ids, row_labels, row_positions):
    starts = [*np.flatnonzero(np.asarray(row_positions) == 0), len(row_positions)]
    return [(row_ids[a:b], row_labels[a:b]) for a, b in itertools.pairwise(starts)]


def test_prepare_lays_out_code_and_records_the_settings(tmp_path, sources, real_tokenizer_dir):
    tokenizer = load_tokenizer(real_tokenizer_dir)
    cfg = config(tmp_path, sources, real_tokenizer_dir, fim_rate=0.5)
    result = prepare(cfg, progress=False)
    m = result.manifest
    want = {"rate": 0.5, "spm_rate": 0.5, "prefix_id": PRE, "suffix_id": SUF, "middle_id": MID}
    assert m["fim"] == want
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["fim"] == want
    layouts = Counter()
    instruction = None
    for split in rows(result).values():
        for ids, labels, pos in zip(
            split["input_ids"], split["labels"], split["position_ids"], strict=True
        ):
            for run_ids, run_labels in runs(ids, labels, pos):
                if set(run_ids) == {2}:
                    continue  # padding
                if -100 in run_labels:  # the instruction: its prompt has no loss
                    instruction = run_ids
                    continue
                assert run_labels == run_ids  # the whole FIM document trains
                layouts[parse(tokenizer, run_ids)[0]] += 1
    assert layouts["psm"] > 0 and layouts["spm"] > 0 and layouts["plain"] > 0
    fim_docs = sum(s["fim_documents"] for s in m["splits"].values())
    assert fim_docs == layouts["psm"] + layouts["spm"]
    prompt = "### Instruction:\nTag <extra_id_0> it.\n\n### Response:\n"
    sp = tokenizer.sp_model
    assert instruction == encode_texts(sp, [prompt], {PRE})[0] + sp.encode("x = 1") + [EOS]
    assert PRE not in instruction  # no sentinel from text, in any document

    again = config(tmp_path, sources, real_tokenizer_dir, "again", fim_rate=0.5)
    assert rows(prepare(again, progress=False)) == rows(result)
    other = config(tmp_path, sources, real_tokenizer_dir, "other", fim_rate=0.5, seed=1)
    other = prepare(other, progress=False)
    assert rows(other) != rows(result)


def test_rate_zero_changes_nothing(tmp_path, sources, real_tokenizer_dir):
    plain = prepare(config(tmp_path, sources, real_tokenizer_dir, "plain"), progress=False)
    zero = config(tmp_path, sources, real_tokenizer_dir, "zero", fim_rate=0, fim_spm_rate=0.9)
    zero = prepare(zero, progress=False)
    assert zero.manifest["fim"] is None and plain.manifest["fim"] is None
    assert rows(zero) == rows(plain)
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_dir / "spiece.model"))
    literal = sp.encode(LITERAL * 4)
    assert PRE in literal
    found = [
        run_ids
        for split in rows(plain).values()
        for row in zip(split["input_ids"], split["labels"], split["position_ids"], strict=True)
        for run_ids, _ in runs(*row)
    ]
    assert literal + [EOS] in found  # SentencePiece's own ids, sentinel id and all


def test_cli_flags_and_bad_rates(tmp_path, sources, real_tokenizer_dir, capsys):
    repo, _ = sources
    argv = ["prep", "--code", str(repo), "--tokenizer", str(real_tokenizer_dir), "--quiet"]
    argv += ["--seq-len", "256", "--out", str(tmp_path / "cli")]
    cli([*argv, "--fim-rate", "0.5", "--fim-spm-rate", "1"])
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["fim"]["rate"] == 0.5 and manifest["fim"]["spm_rate"] == 1.0
    assert "fill-in-the-middle: rate 0.5, SPM 1.0, sentinels 47/48/49" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"replit-ft prep: --fim-rate: must be at most 1, got 1.5"):
        cli([*argv, "--fim-rate", "1.5"])
    with pytest.raises(SystemExit, match=r"--fim-rate: needs seq_len >= 32, got 16"):
        cli([*argv, "--fim-rate", "0.5", "--seq-len", "16"])
