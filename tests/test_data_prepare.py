"""End to end data preparation with the real spiece.model: rows against SentencePiece itself."""

from __future__ import annotations

import errno
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from datasets import DatasetDict

import data_prep.prepare
from data_prep.prepare import PrepConfig, prepare
from data_prep.report import summary
from data_prep.settings import SettingError, build
from finetune.cli import main as cli

CODE = {
    "pkg/a.py": "def add(a, b):\n    return a + b\n" * 40,
    "pkg/b.js": "const x = '<|endoftext|>';\nconsole.log(x);\n",
    "pkg/c.md": "# Title\n\n\tindented\r\n",
    "pkg/dup.py": "def add(a, b):\n    return a + b\n" * 40,
    "pkg/ignored.py": "SECRET = 1\n",
    "pkg/blob.c": "int x;\0\0binary",
}
RECORDS = [
    {"instruction": "Reverse a list.", "input": "", "output": "xs[::-1]"},
    {"instruction": "Add.", "input": "a=1, b=2", "output": "a + b"},
    {"instruction": "Nothing.", "output": "   "},
]


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    for name, text in CODE.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(text.encode())
    (repo / ".gitignore").write_text("pkg/ignored.py\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    jsonl = tmp_path / "instr.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return repo, jsonl


def config(tmp_path: Path, sources, tokenizer: Path, **kw) -> PrepConfig:
    repo, jsonl = sources
    settings = dict(
        out=str(tmp_path / "out"),
        tokenizer=str(tokenizer),
        seq_len=64,
        code=[str(repo)],
        instructions=[str(jsonl)],
        validation_fraction=0.25,
    )
    return PrepConfig(**(settings | kw))


def runs(row: dict) -> list[tuple[list[int], list[int]]]:
    pos = np.asarray(row["position_ids"])
    starts = [*np.flatnonzero(pos == 0), len(pos)]
    ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
    return [(ids[s:e].tolist(), labels[s:e].tolist()) for s, e in itertools.pairwise(starts)]


def expected_pieces(sp, docs: list[tuple[str, str]], seq_len: int):
    """(ids, labels) of every seq_len piece of every document, straight from SentencePiece."""
    pieces = []
    for prompt, completion in docs:
        p, c = sp.encode(prompt), sp.encode(completion)
        ids = p + c + [1]
        labels = [-100] * len(p) + c + [1]
        pieces += [
            (ids[s : s + seq_len], labels[s : s + seq_len]) for s in range(0, len(ids), seq_len)
        ]
    return pieces


def test_rows_hold_every_document_exactly_once(tmp_path, sources, real_tokenizer_dir):
    result = prepare(config(tmp_path, sources, real_tokenizer_dir), progress=False)
    data = result.load()
    assert isinstance(data, DatasetDict) and set(data) == {"train", "validation"}
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_dir / "spiece.model"))
    docs = [(CODE["pkg/a.py"], ""), (CODE["pkg/b.js"], ""), (CODE["pkg/c.md"], "")]
    docs = [("", text) for text, _ in docs] + [
        ("### Instruction:\nReverse a list.\n\n### Response:\n", "xs[::-1]"),
        ("### Instruction:\nAdd.\n\n### Input:\na=1, b=2\n\n### Response:\n", "a + b"),
    ]
    found = []
    for split in data.values():
        for row in split:
            assert len(row["input_ids"]) == 64
            found += runs(row)
    padding = [r for r in found if set(r[0]) == {2} and set(r[1]) == {-100}]
    real = sorted(r for r in found if r not in padding)
    assert real == sorted(expected_pieces(sp, docs, 64))  # each piece once, tokens in order
    m = result.manifest
    assert m["skipped"] == {
        "code: binary": 1,
        "code: duplicate": 1,
        "code: type": 1,  # .gitignore
        "instructions: empty response": 1,
    }
    assert sum(s["documents"] for s in m["splits"].values()) == 5
    assert m["splits"]["validation"]["documents"] == 1
    tokens = sum(len(ids) for ids, _ in real)
    assert sum(s["tokens"] for s in m["splits"].values()) == tokens
    eff = m["splits"]["train"]["packing_efficiency"]
    assert eff == round(m["splits"]["train"]["tokens"] / (64 * m["splits"]["train"]["rows"]), 4)
    assert m["tokenizer"]["sha256"].startswith("7e1ba8b7")


def test_second_run_reuses_and_a_change_redoes(tmp_path, sources, real_tokenizer_dir):
    cfg = config(tmp_path, sources, real_tokenizer_dir)
    first = prepare(cfg, progress=False)
    assert not first.reused
    assert prepare(cfg, progress=False).reused
    (sources[0] / "pkg/c.md").write_text("# Changed\n")
    again = prepare(cfg, progress=False)
    assert not again.reused and again.manifest["fingerprint"] != first.manifest["fingerprint"]
    cfg.seq_len = 32
    assert not prepare(cfg, progress=False).reused


def test_same_inputs_same_rows(tmp_path, sources, real_tokenizer_dir):
    a = prepare(
        config(tmp_path, sources, real_tokenizer_dir, out=str(tmp_path / "a")), progress=False
    )
    b = prepare(
        config(tmp_path, sources, real_tokenizer_dir, out=str(tmp_path / "b")), progress=False
    )
    for split in ("train", "validation"):
        assert a.load()[split].to_dict() == b.load()[split].to_dict()


def test_unpacked_rows_hold_one_document_each(tmp_path, sources, real_tokenizer_dir):
    result = prepare(config(tmp_path, sources, real_tokenizer_dir, packed=False), progress=False)
    for row in result.load()["train"]:
        first, *rest = runs(row)
        assert all(set(ids) == {2} for ids, _ in rest)


def test_failed_write_keeps_the_old_dataset(tmp_path, sources, real_tokenizer_dir, monkeypatch):
    cfg = config(tmp_path, sources, real_tokenizer_dir)
    before = prepare(cfg, progress=False).manifest
    cfg.seq_len = 32

    def crash(self, path, **kw):
        Path(path).mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg, progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instr.jsonl", "out", "repo"]


def test_full_disk_is_an_error_that_says_so_and_leaves_nothing(
    tmp_path, sources, real_tokenizer_dir, monkeypatch
):
    cfg = config(tmp_path, sources, real_tokenizer_dir)
    real_save = DatasetDict.save_to_disk

    def fill_disk(self, path, **kw):
        real_save(self, path, **kw)  # a partial folder, as a real full disk leaves one
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DatasetDict, "save_to_disk", fill_disk)
    with pytest.raises(OSError, match=f"no space left on the device holding {tmp_path} "):
        prepare(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instr.jsonl", "repo"]


def test_stale_temporary_folders_of_dead_processes_are_removed(
    tmp_path, sources, real_tokenizer_dir
):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".out.tmp-{finished.pid}"]  # (an .old-PID one: tests/test_files.py)
        kept = [f".out.tmp-{running.pid}", f".other.tmp-{finished.pid}", ".out.tmp-x"]
        for name in stale + kept:
            (tmp_path / name / "train").mkdir(parents=True)
        prepare(config(tmp_path, sources, real_tokenizer_dir), progress=False)
        left = {p.name for p in tmp_path.iterdir()}
    finally:
        running.kill()
        running.wait()
    assert set(kept) <= left and not set(stale) & left


def test_two_preparations_of_one_folder_write_it_once(
    tmp_path, sources, real_tokenizer_dir, monkeypatch, capsys
):
    """Threads with their own lock file descriptors: flock excludes them as it does processes."""
    writes = []
    real_write = data_prep.prepare._write

    def slow_write(*args):
        writes.append(threading.get_ident())
        time.sleep(1)  # long enough for the other thread to reach the lock
        real_write(*args)

    monkeypatch.setattr(data_prep.prepare, "_write", slow_write)
    cfg = config(tmp_path, sources, real_tokenizer_dir)
    start = threading.Barrier(2)
    results = []

    def run():
        start.wait()
        results.append(prepare(PrepConfig(**vars(cfg)), progress=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(writes) == 1
    assert sorted(r.reused for r in results) == [False, True]
    assert results[0].manifest == results[1].manifest
    assert "waiting for another process preparing" in capsys.readouterr().err


def test_overlong_examples_drop_truncate_or_split(tmp_path, real_tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_dir / "spiece.model"))
    short = ("def f():\n", "    return 1\n")
    long_response = ("# add\n", "x = x + 1\n" * 30)
    long_prompt = ("y = 2\n" * 30, "pass\n")
    records = [short, long_response, long_prompt]
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in records))
    assert len(sp.encode(long_prompt[0])) > 64 and len(sp.encode(long_response[1])) > 64
    code = tmp_path / "code"
    code.mkdir()
    (code / "long.py").write_text("z = 3\n" * 40)  # code is chunked whatever the policy
    base = dict(tokenizer=str(real_tokenizer_dir), seq_len=64, validation_fraction=0.0)
    base |= dict(instructions=[str(jsonl)], code=[str(code)])
    code_pieces = expected_pieces(sp, [("", "z = 3\n" * 40)], 64)
    assert len(code_pieces) > 1

    def rows(policy):
        cfg = PrepConfig(out=str(tmp_path / policy), overlong=policy, **base)
        result = prepare(cfg, progress=False)
        found = [r for row in result.load()["train"] for r in runs(row)]
        real = sorted(r for r in found if not (set(r[0]) == {2} and set(r[1]) == {-100}))
        return result.manifest, real

    manifest, real = rows("drop")
    assert real == sorted(expected_pieces(sp, [short], 64) + code_pieces)
    assert manifest["overlong"] == {"policy": "drop", "dropped": 2, "truncated": 0, "split": 0}
    assert manifest["skipped_files"]["instructions: longer than seq_len"] == [
        f"{jsonl}:2",
        f"{jsonl}:3",
    ]
    assert manifest["splits"]["train"]["documents"] == 2

    manifest, real = rows("truncate")
    p, c = sp.encode(long_response[0]), sp.encode(long_response[1])
    truncated = ((p + c)[:64], ([-100] * len(p) + c)[:64])  # the prompt whole, no EOS
    assert real == sorted([*expected_pieces(sp, [short], 64), truncated, *code_pieces])
    assert manifest["overlong"] == {"policy": "truncate", "dropped": 1, "truncated": 1, "split": 0}
    assert manifest["skipped_files"]["instructions: prompt fills seq_len"] == [f"{jsonl}:3"]

    manifest, real = rows("split")
    assert real == sorted(expected_pieces(sp, records, 64) + code_pieces)
    assert manifest["overlong"] == {"policy": "split", "dropped": 0, "truncated": 0, "split": 2}

    text = summary(prepare(PrepConfig(out=str(tmp_path / "drop"), **base), progress=False))
    assert "2 dropped, 0 truncated, 0 split" in text
    assert f"{jsonl}:2, {jsonl}:3" in " ".join(text.split())
    with pytest.raises(SettingError, match="overlong: 'cut' is not one of 'drop', 'truncate'"):
        build(PrepConfig, dict(base, out="x", overlong="cut"))
    only_long = dict(base, code=[], overlong="drop", out=str(tmp_path / "none"))
    jsonl.write_text(json.dumps({"prompt": long_prompt[0], "completion": "x"}) + "\n")
    with pytest.raises(ValueError, match="1 instructions: longer than seq_len.*truncate or split"):
        prepare(PrepConfig(**only_long), progress=False)


def test_malformed_line_names_file_and_line(tmp_path, sources, real_tokenizer_dir):
    sources[1].write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"instr.jsonl:2"):
        prepare(config(tmp_path, sources, real_tokenizer_dir), progress=False)
    cfg = config(tmp_path, sources, real_tokenizer_dir, skip_bad=True)
    assert prepare(cfg, progress=False).manifest["skipped"]["instructions: malformed json"] == 1


def test_empty_result_says_which_filters_removed_everything(tmp_path, sources, real_tokenizer_dir):
    cfg = config(tmp_path, sources, real_tokenizer_dir, instructions=[], include=["*.txt"])
    with pytest.raises(
        ValueError, match=r"no documents left.*6 files under .*repo; skipped: 6 code: type"
    ):
        prepare(cfg, progress=False)


def test_settings_are_checked_by_their_declared_rules():
    with pytest.raises(SettingError, match=r"^seq_length: unknown key \(did you mean seq_len\?\)"):
        build(PrepConfig, {"out": "x", "code": ["a"], "seq_length": 10})
    with pytest.raises(SettingError, match=r"^seq_len: must be at least 2, got 1"):
        build(PrepConfig, {"code": ["a"], "seq_len": 1})
    with pytest.raises(SettingError, match=r"^validation_fraction: must be less than 1, got 1.0"):
        build(PrepConfig, {"code": ["a"], "validation_fraction": 1})
    with pytest.raises(SettingError, match=r"^format: 'csv' is not one of 'auto', 'alpaca'"):
        build(PrepConfig, {"code": ["a"], "format": "csv"})
    with pytest.raises(SettingError, match=r"^code: nothing to prepare"):
        build(PrepConfig, {"seq_len": 64})
    with pytest.raises(SettingError, match=r"^packed: expected true or false, got 1"):
        build(PrepConfig, {"code": ["a"], "packed": 1})
    built = build(PrepConfig, {"code": "a", "validation_fraction": 0})
    assert built.code == ["a"] and built.validation_fraction == 0.0


def test_cli_prep_prints_a_summary(tmp_path, sources, real_tokenizer_dir, capsys):
    repo, jsonl = sources
    out = tmp_path / "cli"
    argv = ["prep", "--code", str(repo), "--instructions", str(jsonl), "--quiet"]
    argv += ["--tokenizer", str(real_tokenizer_dir), "--seq-len", "64", "--out", str(out)]
    cli(argv)
    text = capsys.readouterr().out
    assert f"dataset  {out}" in text and "train" in text and "binary" in text
    assert "pkg/blob.c" in text  # skipped files are named
    assert (out / "manifest.json").is_file()
    cli(argv)
    assert "reused" in capsys.readouterr().out


def test_cli_prep_names_a_missing_input_and_its_key(tmp_path, real_tokenizer_dir):
    argv = ["prep", "--tokenizer", str(real_tokenizer_dir), "--out", str(tmp_path / "out")]
    for given, problem in [("nowhere", "no such file or folder"), ("no/*.py", "no files match")]:
        with pytest.raises(SystemExit) as caught:
            cli([*argv, "--code", str(tmp_path / given)])
        assert str(caught.value) == (
            f"replit-ft prep: data.code: {tmp_path / given}: {problem}: point data.code (or "
            "--code) at your code's folders, files or globs"
        )
    with pytest.raises(SystemExit) as caught:
        cli([*argv, "--instructions", str(tmp_path / "nope.jsonl")])
    assert str(caught.value) == (
        f"replit-ft prep: data.instructions: {tmp_path / 'nope.jsonl'}: no such file"
    )


def test_summary_names_the_first_skipped_files_and_the_manifest_all(tmp_path, real_tokenizer_dir):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "main.py").write_text("x = 1\n")
    for i in range(25):
        (folder / f"notes{i:02}.txt").write_text(f"{i}\n")
    cfg = PrepConfig(
        out=str(tmp_path / "out"), tokenizer=str(real_tokenizer_dir), code=[str(folder)]
    )
    result = prepare(cfg, progress=False)
    every = [f"notes{i:02}.txt" for i in range(25)]
    assert result.manifest["skipped_files"] == {"code: type": every}
    text = summary(result)
    assert ", ".join(every[:20]) in " ".join(text.split()) and "notes20.txt" not in text
    assert f"and 5 more in {tmp_path / 'out' / 'manifest.json'}" in " ".join(text.split())


def test_cli_follow_links(tmp_path, real_tokenizer_dir, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("KEY = 1\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "main.py").write_text("x = 1\n")
    (tree / "secret.py").symlink_to(outside / "secret.py")
    argv = ["prep", "--code", str(tree), "--tokenizer", str(real_tokenizer_dir), "--quiet"]
    cli([*argv, "--out", str(tmp_path / "kept")])
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert manifest["skipped_files"] == {"code: link outside the tree": ["secret.py"]}
    assert "link outside the tree" in capsys.readouterr().out
    cli([*argv, "--out", str(tmp_path / "followed"), "--follow-links"])
    manifest = json.loads((tmp_path / "followed" / "manifest.json").read_text())
    assert manifest["skipped"] == {} and manifest["sources"][0]["documents"] == 2
