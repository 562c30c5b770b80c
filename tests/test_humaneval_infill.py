"""HumanEval single-line infilling: the tasks, oracles through the sandbox, the command line."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from finetune import generate as generate_module
from finetune.cli import main
from finetune.generate import fim_settings, generate, load_for_generation
from finetune.humaneval import load_problems
from finetune.humaneval_infill import (
    filled_middle,
    infill_tasks,
    is_exact,
    write_results,
)
from finetune.journal import JOURNAL
from finetune.sandbox import Sandbox
from model.random_checkpoint import write_checkpoint

FIM = {"rate": 0.5, "spm_rate": 0.5, "prefix_id": 47, "suffix_id": 48, "middle_id": 49}


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox()


def test_tasks_are_the_non_blank_lines_of_each_solution(problems):
    tasks = infill_tasks(problems)
    nonblank = re.compile(r"^[ \t]*\S.*$", re.MULTILINE)  # counted apart from the splitting
    counts = {p["task_id"]: len(nonblank.findall(p["canonical_solution"])) for p in problems}
    assert len(tasks) == sum(counts.values()) == 1033
    assert {p: sum(t.task_id == p for t in tasks) for p in counts} == counts
    first = [t for t in tasks if t.task_id == "HumanEval/0"]  # blank line 6 is no task
    assert [t.line for t in first] == [0, 1, 2, 3, 4, 5, 7]
    assert first[-1].middle == "    return False\n" and first[-1].after == ""
    assert first[3].middle == "                distance = abs(elem - elem2)\n"
    by_id = {p["task_id"]: p for p in problems}
    for t in tasks:  # each task gives back its solution, with its line in place
        assert t.before + t.middle + t.after == by_id[t.task_id]["canonical_solution"]
        assert t.before.count("\n") == t.line  # the line's index in the solution
        assert t.middle.strip() and t.middle.endswith("\n") and t.middle.count("\n") == 1


def test_filled_middle_and_exact_match():
    assert filled_middle("    x = 1") == "    x = 1\n"  # cut at the newline stop
    assert filled_middle("    x = 1\n    y = 2\n") == "    x = 1\n"  # one line only
    assert filled_middle("") == "\n"
    assert is_exact("    x = 1\n", "    x = 1  \n")  # trailing whitespace does not count
    assert not is_exact("x = 1\n", "    x = 1\n")  # indentation does
    assert not is_exact("    x = 2\n", "    x = 1\n")


def test_oracle_scores_one_on_every_task(problems, sandbox, tmp_path):
    """The true line in every task of all 164 problems: every program passes."""
    tasks = infill_tasks(problems)
    results = write_results(
        tmp_path, tasks, [t.middle for t in tasks], problems, sandbox, {}, {}, progress=False
    )
    assert results["pass@1"] == 1.0 and results["exact_match"] == 1.0
    assert results["outcomes"] == {"passed": 1033, "failed": 0, "timed out": 0}
    assert results["problems"] == 164 and results["by_problem"]["HumanEval/0"] == {
        "tasks": 7,
        "passed": 7,
        "exact": 7,
    }
    assert json.loads((tmp_path / "results.json").read_text())["pass@1"] == 1.0
    lines = (tmp_path / "samples_results.jsonl").read_text().splitlines()
    assert len(lines) == 1033 and json.loads(lines[6]) == {
        "task_id": "HumanEval/0",
        "line": 7,
        "masked": "    return False\n",
        "middle": "    return False\n",
        "passed": True,
        "result": "passed",
        "exact": True,
    }


def test_a_wrong_oracle_fails_where_it_must(problems, sandbox, tmp_path):
    """`pass` at column 0 ends the function: any solution line after it is then an indented
    line outside any block, which Python refuses to compile."""
    problems = problems[:20]
    tasks = infill_tasks(problems)
    results = write_results(
        tmp_path, tasks, ["pass\n"] * len(tasks), problems, sandbox, {}, {}, progress=False
    )
    assert results["pass@1"] == 0.0 and results["exact_match"] == 0.0
    scored = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").open()]
    assert all(s["middle"] == "pass\n" and not s["passed"] for s in scored)
    for task, s in zip(tasks, scored, strict=True):
        if task.after.strip():
            assert re.match(r"failed: (IndentationError|SyntaxError)", s["result"]), s
    assert results["by_problem"]["HumanEval/0"] == {"tasks": 7, "passed": 0, "exact": 0}


def write_info(folder: Path, fim: dict | None) -> None:
    """replit_ft.json as train and merge write it (only `fim` matters here)."""
    info = {"base": "tiny", "max_seq_len": 2048, "data": {"fingerprint": "x"}, "fim": fim}
    (folder / "replit_ft.json").write_text(json.dumps({**info, "recipe": {}}))


def test_command_line_end_to_end(real_tokenizer_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    write_checkpoint(
        model_dir, n_layers=2, d_model=192, n_heads=6, tokenizer=real_tokenizer_dir, seed=1
    )
    write_info(model_dir, FIM)
    out = tmp_path / "out"
    main(
        ["eval", "infill", "--model", str(model_dir), "--out", str(out), "--limit", "1"]
        + ["--max-new-tokens", "6", "--batch-size", "3"]
    )
    results = json.loads((out / "results.json").read_text())
    assert f"1 problems, 7 tasks: pass@1 {results['pass@1']:.4f}" in capsys.readouterr().out
    assert results["tasks"] == 7 and results["problems"] == 1
    assert results["settings"]["fim"] == FIM | {"order": "PSM"}
    assert results["settings"]["stop"] == ["\n"] and results["settings"]["limit"] == 1
    assert results["settings"]["sandbox"]["network"] == "none"
    scored = [json.loads(line) for line in (out / "samples_results.jsonl").open()]
    # The same middles from generate() itself, one task at a time.
    model, tokenizer = load_for_generation(model_dir)
    problem = load_problems(1)[0]
    tasks = infill_tasks([problem])
    want = [
        generate(
            model,
            tokenizer,
            [problem["prompt"] + t.before],
            suffix=[t.after],
            fim=fim_settings(model_dir),
            temperature=0,
            max_new_tokens=6,
            stop=["\n"],
        )[0]
        for t in tasks
    ]
    assert [s["middle"] for s in scored] == [w + "\n" for w in want]
    assert [(s["line"], s["masked"]) for s in scored] == [(t.line, t.middle) for t in tasks]
    assert results["pass@1"] == sum(s["passed"] for s in scored) / 7
    assert results["exact_match"] == sum(s["exact"] for s in scored) / 7
    assert all(s["exact"] == (s["middle"].rstrip() == s["masked"].rstrip()) for s in scored)


def test_a_model_without_fim_is_refused_before_it_loads(tiny_checkpoint, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate_module, "load_for_generation", no_loading)
    command = ["eval", "infill", "--model", str(tiny_checkpoint), "--out", str(tmp_path)]
    missing = f"no fim settings in {tiny_checkpoint}/replit_ft.json"
    with pytest.raises(SystemExit, match=f"replit-ft eval: this model was not trained .*{missing}"):
        main(command)
    with pytest.raises(SystemExit, match="replit-ft eval: --max-new-tokens must be a positive"):
        main([*command, "--max-new-tokens", "0"])
    with pytest.raises(SystemExit, match="replit-ft eval: --workers must be at least 1, got 0"):
        main([*command, "--workers", "0"])
    with pytest.raises(SystemExit, match="name a model"):
        main(["eval", "infill", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
    # With an adapter its own record counts, not its base's.
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    write_info(base, FIM)
    write_info(adapter, None)
    command = ["eval", "infill", "--model", str(base), "--adapter", str(adapter)]
    with pytest.raises(SystemExit, match=f"no fim settings in {adapter}/replit_ft.json"):
        main([*command, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_an_interrupted_infill_resumes_and_a_changed_model_is_refused(
    base, tmp_path, generate_calls
):
    model = shutil.copytree(base, tmp_path / "model")
    write_info(model, FIM)
    command = ["eval", "infill", "--model", str(model), "--limit", "1"]
    command += ["--max-new-tokens", "4", "--batch-size", "3"]  # 7 tasks: batches of 3, 3, 1
    main([*command, "--out", str(tmp_path / "whole")])
    want = (tmp_path / "whole" / "samples_results.jsonl").read_text()
    out = tmp_path / "out"
    generate_calls(fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted at batch 2"):
        main([*command, "--out", str(out)])
    header, *first = [json.loads(line) for line in (out / JOURNAL).open()]
    assert header["settings"]["fim"] == FIM | {"order": "PSM"} and len(first) == 3
    calls = generate_calls()
    main([*command, "--out", str(out)])
    assert calls == [3, 1]  # the first batch was on disk
    assert (out / "samples_results.jsonl").read_text() == want
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["resumed"] == 3 and not (out / JOURNAL).exists()
    # Retrained in place: the same path, other weights. Its journal is not this model's.
    generate_calls(fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*command, "--out", str(out)])
    weights = model / "pytorch_model.bin"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    calls = generate_calls()
    with pytest.raises(SystemExit, match=f"other settings \\(the files in {model} \\(changed"):
        main([*command, "--out", str(out)])
    assert calls == []
