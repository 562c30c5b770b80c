"""HumanEval single-line infilling: each line of each canonical solution masked in turn, filled
by a fill-in-the-middle model, and the problem's tests run on the result.

A task is one non-blank line of one problem's canonical solution (the solution split after
each "\\n"; blank and whitespace-only lines are not tasks, comment lines are). The model gets

    prefix  the problem's prompt + the solution's lines before the masked one
    suffix  the solution's lines after it

and writes the middle. The masked line is the whole line: its indentation, its text and its
"\\n". Generation is greedy and stops at EOS or at the first "\\n" (a single line is asked
for), and the filled middle is the generated text up to its first "\\n", plus "\\n": the line
ending is given, the indentation is not. Then

    prompt + before + filled middle + after

is checked exactly as `eval humaneval` checks a completion (`humaneval.score`: the same
program, the same sandbox). pass@1 is the share of tasks whose program passes; exact match
the share whose filled middle equals the masked line up to trailing whitespace (indentation
must match: in Python it is meaning). Both are over tasks, so problems with long solutions
weigh more; results.json also counts them per problem.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.files import write_atomic
from data_prep.fim import FimSettings
from finetune.humaneval import benchmark, generate_longest_first, load_problems, score
from finetune.journal import Journal, exclusive
from finetune.sandbox import Sandbox

STOP = ("\n",)  # one line: generation ends at the first newline (or EOS)
MIDDLE = "the whole masked line: indentation, text and its newline"
FILLED = "the generated text up to its first newline, plus the newline"
EXACT = "filled middle == masked line, trailing whitespace (the newline included) ignored"


@dataclass(frozen=True)
class InfillTask:
    """One masked line of one problem's canonical solution."""

    task_id: str  # the problem's, e.g. "HumanEval/0"
    line: int  # the masked line's index among the solution's lines (0-based, blank ones counted)
    before: str  # the solution's lines before it
    middle: str  # the masked line, with its indentation and "\n"
    after: str  # the solution's lines after it


def solution_lines(solution: str) -> list[str]:
    """The solution cut after each "\\n" (only "\\n": it is what ends a line in these files)."""
    lines = solution.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def infill_tasks(problems: Sequence[dict[str, Any]]) -> list[InfillTask]:
    """Every non-blank line of every problem's canonical solution, masked in turn, in order."""
    tasks = []
    for problem in problems:
        lines = solution_lines(problem["canonical_solution"])
        for i, line in enumerate(lines):
            if line.strip():
                before, after = "".join(lines[:i]), "".join(lines[i + 1 :])
                tasks.append(InfillTask(problem["task_id"], i, before, line, after))
    return tasks


def filled_middle(text: str) -> str:
    """What goes in the masked line's place: `text` up to its first newline, plus a newline."""
    return text.split("\n", 1)[0] + "\n"


def is_exact(filled: str, masked: str) -> bool:
    """The filled middle is the masked line, up to trailing whitespace."""
    return filled.rstrip() == masked.rstrip()


def generate_middles(
    model,
    tokenizer,
    tasks: Sequence[InfillTask],
    problems: Sequence[dict[str, Any]],
    fim: FimSettings,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    journal: Journal | None = None,
) -> list[str]:
    """The model's greedy middle of each task (cut at STOP), with the kit's `generate`.

    Tasks go longest first in batches of `batch_size` (left-padded, KV cache). With a
    `journal`, middles already in it are not generated again, and each batch goes to it as
    soon as it is done.
    """
    prompts = {p["task_id"]: p["prompt"] for p in problems}
    middles = generate_longest_first(
        model,
        tokenizer,
        [prompts[t.task_id] + t.before for t in tasks],
        suffix=[t.after for t in tasks],
        batch_size=batch_size,
        desc="infill",
        progress=progress,
        journal=journal,
        fim=fim,
        max_new_tokens=max_new_tokens,
        temperature=0,
        stop=STOP,
    )
    return middles


def score_middles(
    tasks: Sequence[InfillTask],
    middles: Sequence[str],
    problems: Sequence[dict[str, Any]],
    sandbox: Sandbox,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each task with its filled middle, run as `eval humaneval` runs a completion."""
    filled = [filled_middle(m) for m in middles]
    samples = [
        {"task_id": t.task_id, "completion": t.before + m + t.after}
        for t, m in zip(tasks, filled, strict=True)
    ]
    scored = score(samples, problems, sandbox, workers=workers, progress=progress)
    return [
        {
            "task_id": t.task_id,
            "line": t.line,
            "masked": t.middle,
            "middle": m,
            "passed": s["passed"],
            "result": s["result"],
            "exact": is_exact(m, t.middle),
        }
        for t, m, s in zip(tasks, filled, scored, strict=True)
    ]


def summarize(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """pass@1 and exact match over tasks, the outcomes, and the counts per problem."""
    by_problem: dict[str, dict[str, int]] = {}
    for s in scored:
        counts = by_problem.setdefault(s["task_id"], {"tasks": 0, "passed": 0, "exact": 0})
        counts["tasks"] += 1
        counts["passed"] += s["passed"]
        counts["exact"] += s["exact"]
    kinds = Counter(s["result"].split(":")[0] for s in scored)
    return {
        "pass@1": sum(s["passed"] for s in scored) / len(scored),
        "exact_match": sum(s["exact"] for s in scored) / len(scored),
        "tasks": len(scored),
        "problems": len(by_problem),
        "outcomes": {kind: kinds[kind] for kind in ("passed", "failed", "timed out")},
        "by_problem": by_problem,
    }


def evaluate_infill(
    out: str | os.PathLike,
    sandbox: Sandbox,
    *,
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    quantization: str | None = None,
    attn_impl: str = "auto",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    limit: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Infill every task of the first `limit` problems with `model`/`adapter`, score them, and
    write DIR/results.json and DIR/samples_results.jsonl.

    The FIM settings come from the adapter folder (else the model folder) before anything
    loads: a model trained without FIM is refused with `fim_settings`' error. One process at
    a time per DIR (`journal.exclusive`); generation resumes from DIR's journal.
    """
    from finetune.generate import check_options, fim_settings, load_for_generation

    check_options(
        max_new_tokens=max_new_tokens,
        temperature=0,
        top_p=1,
        top_k=0,
        stop=STOP,
        seed=None,
        batch_size=batch_size,
    )
    if model is None and adapter is None:
        raise ValueError("name a model (--model), or an adapter (--adapter)")
    fim = fim_settings(adapter if adapter is not None else model)
    problems = load_problems(limit)
    with exclusive(out):
        loaded, tokenizer = load_for_generation(
            model, adapter, attn_impl=attn_impl, quantization=quantization
        )
        dtype = loaded.get_input_embeddings().weight.dtype
        settings = {
            "benchmark": "single-line infilling of the canonical solutions of " + benchmark(),
            "model": str(model) if model is not None else None,
            "adapter": str(adapter) if adapter is not None else None,
            "quantization": quantization,
            "attn_impl": attn_impl,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "limit": limit,
            "fim": asdict(fim) | {"order": "SPM" if fim.spm_at_inference else "PSM"},
            "decoding": "greedy",
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        }
        journal = Journal(out, settings, files=(model, adapter))
        tasks = infill_tasks(problems)
        started = time.perf_counter()
        middles = generate_middles(
            loaded,
            tokenizer,
            tasks,
            problems,
            fim,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            journal=journal,
        )
        seconds = {"generate": round(time.perf_counter() - started, 2)}
        results = write_results(
            out,
            tasks,
            middles,
            problems,
            sandbox,
            journal.settings | {"resumed": journal.resumed},
            seconds,
            workers=workers,
            progress=progress,
        )
        journal.remove()
        return results


def write_results(
    out: str | os.PathLike,
    tasks: Sequence[InfillTask],
    middles: Sequence[str],
    problems: Sequence[dict[str, Any]],
    sandbox: Sandbox,
    settings: dict[str, Any],
    seconds: dict[str, float],
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the middles, then write DIR/results.json and DIR/samples_results.jsonl whole."""
    out = Path(out)
    started = time.perf_counter()
    scored = score_middles(tasks, middles, problems, sandbox, workers=workers, progress=progress)
    seconds = seconds | {"execute": round(time.perf_counter() - started, 2)}
    results = summarize(scored) | {
        "settings": settings
        | {
            "stop": list(STOP),
            "middle": MIDDLE,
            "filled": FILLED,
            "exact_match": EXACT,
            "sandbox": sandbox.settings(),
        },
        "seconds": seconds,
    }
    write_atomic(out / "samples_results.jsonl", "".join(json.dumps(s) + "\n" for s in scored))
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
