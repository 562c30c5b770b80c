"""HumanEval: the estimator, the 164 canonical solutions, sample files, and generation."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import yaml

from finetune import humaneval
from finetune.cli import main
from finetune.generate import generate, load_for_generation
from finetune.humaneval import (
    STOP,
    Decoding,
    evaluate_loaded,
    generate_samples,
    load_problems,
    pass_at_k,
    read_samples,
    score,
    summarize,
)
from finetune.journal import JOURNAL
from finetune.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox()


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return load_problems()


@pytest.mark.parametrize(
    ("n", "c", "k", "want"),
    [
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # fewer than 4 failures: any 4 samples hold a pass
        (10, 1, 5, 0.5),  # 1 - C(9,5)/C(10,5) = 1 - 126/252
    ],
)
def test_pass_at_k_by_hand(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_against_exact_binomials_where_floats_overflow():
    for n, c, k in [(200, 3, 100), (200, 37, 10), (1000, 1, 999)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_summary_averages_over_problems_up_to_the_fewest_samples():
    scored = [
        {"task_id": "A", "passed": True, "result": "passed"},
        {"task_id": "A", "passed": False, "result": "failed: AssertionError"},
        {"task_id": "B", "passed": False, "result": "timed out"},
        {"task_id": "B", "passed": False, "result": "failed: x: y"},
        {"task_id": "B", "passed": True, "result": "passed"},
    ]
    summary = summarize(scored)
    assert summary["pass@1"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert summary["pass@2"] == pytest.approx((1 + (1 - 1 / 3)) / 2)  # B: 1 - C(2,2)/C(3,2)
    assert "pass@3" not in summary and summary["samples_per_task"] == "2..3"
    assert summary["outcomes"] == {"passed": 2, "failed": 2, "timed out": 1}


def test_canonical_solutions_all_pass(problems, sandbox, tmp_path, capsys):
    """All 164, from a samples file, through the command line."""
    samples = tmp_path / "samples.jsonl.gz"
    with gzip.open(samples, "wt") as file:
        for p in problems:
            file.write(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}))
            file.write("\n")
    main(["eval", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "out")])
    assert "164 problems, 164 samples: pass@1 1.0000" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pass@1"] == 1.0 and results["outcomes"]["passed"] == 164
    assert results["settings"]["sandbox"]["network"] == "none"
    lines = (tmp_path / "out" / "samples_results.jsonl").read_text().splitlines()
    assert [json.loads(line)["result"] for line in lines] == ["passed"] * 164
    assert read_samples(tmp_path / "out" / "samples_results.jsonl", problems)[5] == {
        "task_id": "HumanEval/5",
        "completion": problems[5]["canonical_solution"],
    }


def test_empty_bodies_all_fail(problems, sandbox):
    samples = [{"task_id": p["task_id"], "completion": "    pass\n"} for p in problems]
    scored = score(samples, problems, sandbox, progress=False)
    assert summarize(scored)["pass@1"] == 0.0
    assert {s["result"].split(":")[0] for s in scored} == {"failed"}


def test_bad_sample_files_name_the_line(problems, tmp_path):
    cases = {
        '{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": ': ":2: not valid JSON",
        '{"task_id": "HumanEval/164", "completion": "x"}': ":1: task_id 'HumanEval/164' is not",
        '\n{"task_id": "HumanEval/3", "completion": 5}': ":2: completion must be a string",
        '["HumanEval/3"]': ":1: expected an object",
        "\n\n": "no samples in it",
    }
    for text, message in cases.items():
        (tmp_path / "s.jsonl").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_samples(tmp_path / "s.jsonl", problems)
    with pytest.raises(SystemExit, match="replit-ft eval: .*s.jsonl: no samples"):
        main(["eval", "humaneval", "--samples", str(tmp_path / "s.jsonl"), "--out", "x"])
    missing = [(tmp_path / "nope.jsonl", "no such file"), (tmp_path, "a folder, not a file")]
    for given, problem in missing:
        with pytest.raises(SystemExit) as caught:
            main(["eval", "humaneval", "--samples", str(given), "--out", str(tmp_path / "x")])
        assert str(caught.value) == f"replit-ft eval: {given}: {problem}"


def test_settings_that_make_no_sense_are_refused():
    with pytest.raises(ValueError, match="--temperature > 0"):
        Decoding(samples_per_task=5)
    with pytest.raises(ValueError, match="--limit must be between 1 and 164"):
        load_problems(165)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_for_generation(tiny_checkpoint)


def test_generation_cuts_at_the_stop_sequences_as_generate_does(loaded, monkeypatch):
    model, tokenizer = loaded
    problems = load_problems(3)
    prompts = [p["prompt"] for p in problems]
    greedy = {"temperature": 0, "max_new_tokens": 16, "top_k": 0}
    free = [generate(model, tokenizer, [p], **greedy)[0] for p in prompts]
    stop = free[1][3:6]  # text the tiny model writes: a stop sequence that does cut
    monkeypatch.setattr(humaneval, "STOP", (*STOP, stop))
    want = [generate(model, tokenizer, [p], stop=humaneval.STOP, **greedy)[0] for p in prompts]
    assert want[1] == free[1][: free[1].index(stop)].rstrip() != free[1]
    got = generate_samples(
        model, tokenizer, problems, Decoding(max_new_tokens=16, batch_size=2), progress=False
    )
    assert [s["completion"] for s in got] == want
    assert [s["task_id"] for s in got] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_several_samples_per_task_are_drawn_apart(loaded):
    model, tokenizer = loaded
    decoding = Decoding(samples_per_task=3, temperature=1.0, max_new_tokens=6, batch_size=2)
    got = generate_samples(model, tokenizer, load_problems(1), decoding, progress=False)
    assert [s["task_id"] for s in got] == ["HumanEval/0"] * 3
    assert len({s["completion"] for s in got}) > 1
    again = generate_samples(model, tokenizer, load_problems(1), decoding, progress=False)
    assert again == got  # the seed fixes them


def test_a_run_records_its_settings(loaded, sandbox, tmp_path):
    model, tokenizer = loaded
    about = {"model": "tiny"}
    decoding = Decoding(max_new_tokens=8)
    results = evaluate_loaded(tmp_path, sandbox, model, tokenizer, about, decoding, limit=2)
    assert results["pass@1"] == 0.0 and results["problems"] == 2  # a random model
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["stop"] == list(STOP)
    assert (
        saved["settings"].items() >= {"temperature": 0.0, "max_new_tokens": 8, "limit": 2}.items()
    )
    assert len(read_samples(tmp_path / "samples.jsonl", load_problems())) == 2


def test_command_line_generates_and_scores(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    command = ["eval", "humaneval", "--model", str(tiny_checkpoint), "--out", str(out)]
    main([*command, "--limit", "2", "--max-new-tokens", "8", "--workers", "1"])
    assert "2 problems, 2 samples: pass@1 0.0000" in capsys.readouterr().out
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["model"] == str(tiny_checkpoint) and settings["quantization"] is None
    with pytest.raises(SystemExit, match="replit-ft eval: score a samples file"):
        main(["eval", "humaneval", "--out", str(out)])


@pytest.fixture(scope="module")
def small(base):
    return load_for_generation(base)


FIVE = Decoding(max_new_tokens=6, batch_size=2)  # 5 problems: batches of 2, 2 and 1


def journal_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]


def interrupted(small, sandbox, out: Path, generate_calls) -> list[int]:
    """An eval of the first five problems into `out`, stopped (as a kill would stop it) in
    its second generate call; returns the calls' prompt counts."""
    model, tokenizer = small
    calls = generate_calls(fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted at batch 2"):
        evaluate_loaded(out, sandbox, model, tokenizer, {"model": "base"}, FIVE, 5, progress=False)
    return calls


def test_an_interrupted_generation_resumes_where_it_stopped(
    small, sandbox, tmp_path, generate_calls
):
    model, tokenizer = small
    whole = evaluate_loaded(
        tmp_path / "whole", sandbox, model, tokenizer, {"model": "base"}, FIVE, 5, progress=False
    )
    want = (tmp_path / "whole" / "samples.jsonl").read_text()
    completions = [json.loads(line)["completion"] for line in want.splitlines()]
    out = tmp_path / "out"
    interrupted(small, sandbox, out, generate_calls)
    header, *first = journal_lines(out)
    prompts = [p["prompt"] for p in load_problems(5)]
    longest = sorted(range(5), key=lambda i: -len(prompts[i]))[:2]
    assert header["settings"]["max_new_tokens"] == 6 and header["settings"]["limit"] == 5
    assert [(r["index"], r["completion"]) for r in first] == [(i, completions[i]) for i in longest]
    assert not (out / "results.json").exists() and not (out / "samples.jsonl").exists()

    calls = generate_calls()
    again = evaluate_loaded(
        out, sandbox, model, tokenizer, {"model": "base"}, FIVE, 5, progress=False
    )
    assert calls == [2, 1]  # the two batches that were not on disk, and nothing else
    assert (out / "samples.jsonl").read_text() == want
    assert again["settings"]["resumed"] == 2 and whole["settings"]["resumed"] == 0
    assert again["pass@1"] == whole["pass@1"] and not (out / JOURNAL).exists()


def test_a_cut_last_line_is_ignored_and_its_batch_generated_again(
    small, sandbox, tmp_path, generate_calls
):
    model, tokenizer = small
    out = tmp_path / "out"
    interrupted(small, sandbox, out, generate_calls)
    header, *first = journal_lines(out)
    done = {r["index"] for r in first}
    prompts = [p["prompt"] for p in load_problems(5)]
    second = sorted(set(range(5)) - done, key=lambda i: -len(prompts[i]))[:2]
    # A kill in the middle of the second batch's append: one line whole, the next one cut.
    line = json.dumps({"job": header["job"], "index": second[0], "completion": "WRONG"}) + "\n"
    cut = json.dumps({"job": header["job"], "index": second[1], "completion": "x"})[:25]
    with open(out / JOURNAL, "a") as file:
        file.write(line + cut)
    calls = interrupted(small, sandbox, out, generate_calls)
    assert calls == [2, 1]  # the second batch whole (not all on disk), then the interrupted one
    lines = journal_lines(out)  # every line whole: the cut one was cut off before appending
    assert [r["index"] for r in lines[1:]] == [*[r["index"] for r in first], second[0], *second]
    calls = generate_calls()
    results = evaluate_loaded(
        out, sandbox, model, tokenizer, {"model": "base"}, FIVE, 5, progress=False
    )
    assert calls == [1] and results["settings"]["resumed"] == 4
    got = read_samples(out / "samples.jsonl", load_problems())
    assert "WRONG" not in [s["completion"] for s in got]  # the batch's later lines count
    fresh = generate_samples(model, tokenizer, load_problems(5), FIVE, progress=False)
    assert got == fresh


def test_a_journal_of_other_settings_is_refused_or_restarted(
    small, sandbox, tmp_path, generate_calls
):
    model, tokenizer = small
    out = tmp_path / "out"
    interrupted(small, sandbox, out, generate_calls)
    before = (out / JOURNAL).read_bytes()
    other = Decoding(max_new_tokens=7, batch_size=2)
    calls = generate_calls()
    with pytest.raises(ValueError) as refused:
        evaluate_loaded(out, sandbox, model, tokenizer, {"model": "b2"}, other, 5, progress=False)
    assert str(refused.value) == (
        f"{out / JOURNAL} holds completions generated with other settings (max_new_tokens: 6 "
        "then, 7 now; model: 'base' then, 'b2' now): rerun with those settings to resume, or "
        f"delete {out / JOURNAL} (or choose another --out) to start over"
    )
    assert (out / JOURNAL).read_bytes() == before and calls == []
    results = evaluate_loaded(
        out, sandbox, model, tokenizer, {"model": "b2"}, other, 5, progress=False, restart=True
    )
    assert calls == [2, 2, 1] and results["settings"]["resumed"] == 0
    assert results["settings"]["max_new_tokens"] == 7 and not (out / JOURNAL).exists()


def test_a_second_process_evaluating_into_the_same_folder_is_refused(base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    hold = (
        "import sys, time\nfrom finetune.journal import exclusive\nwith exclusive(sys.argv[1]):\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "    print('held', flush=True)\n    time.sleep(60)", out],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    command = ["eval", "humaneval", "--model", str(base), "--out", str(out), "--limit", "1"]
    try:
        assert holder.stdout.readline() == "held\n"
        with monkeypatch.context() as patch:
            patch.setattr("finetune.generate.load_for_generation", pytest.fail)  # not loaded
            busy = f"replit-ft eval: another process is evaluating into {out} .*--out"
            with pytest.raises(SystemExit, match=busy):
                main(command)
    finally:
        holder.kill()
        holder.wait()
    main([*command, "--max-new-tokens", "4"])  # the lock goes with its holder, even killed
    assert json.loads((out / "results.json").read_text())["problems"] == 1


def test_training_ends_with_pass_at_1_in_the_summary_and_tensorboard(
    tmp_path, real_tokenizer_dir, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.recipe import load_recipe
    from finetune.train import train
    from model.random_checkpoint import write_checkpoint

    base = write_checkpoint(
        tmp_path / "base", n_layers=2, d_model=64, n_heads=4, tokenizer=real_tokenizer_dir
    )
    recipe = {  # full precision: 4-bit layers decode slowly on CPU, and that is not tested here
        "model": {"name": str(base), "quantization": None, "compute_dtype": "fp32"},
        "data": {"code": [str(ROOT / "model")], "seq_len": 128, "out": str(tmp_path / "data")},
        "lora": {"r": 4},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "grad_accum": 1},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="train.eval_humaneval: must be at most 164, got 165"):
        load_recipe(tmp_path / "recipe.yaml", ["train.eval_humaneval=165"])
    run = train(load_recipe(tmp_path / "recipe.yaml", ["train.eval_humaneval=1"]), quiet=True)
    captured = capsys.readouterr()
    assert "%|" not in captured.out + captured.err  # --quiet: the evaluation's bars too
    run = run.parent
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert summary["humaneval_pass@1"] == 0.0 and summary["humaneval_problems"] == 1
    results = json.loads((run / "humaneval" / "results.json").read_text())
    assert results["problems"] == 1 and results["settings"]["temperature"] == 0.0
    assert results["settings"]["adapter_sha256"] == summary["adapter_sha256_per_rank"][0]
    logged = []
    for events in run.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        logged += accumulator.Tags()["scalars"]
    assert "eval/humaneval_pass@1" in logged


@pytest.mark.parametrize("benchmark", ["humaneval", "infill", "context"])
def test_an_out_that_is_a_file_is_refused_before_any_work(benchmark, tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    out.write_text("{}")
    monkeypatch.setattr("finetune.generate.load_for_generation", pytest.fail)  # nothing loads
    command = ["eval", benchmark, "--model", str(tmp_path), "--out", str(out)]
    command += ["--code", str(tmp_path), "--seq-len", "64"] if benchmark == "context" else []
    with pytest.raises(SystemExit) as caught:
        main(command)
    assert (
        str(caught.value)
        == f"replit-ft eval: --out {out}: exists and is not a folder; give a folder"
    )
