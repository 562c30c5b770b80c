"""Data preparation speed: `data_prep.prepare` against the usual `datasets.map` recipe.

Corpus: Python sources from this virtualenv's site-packages, copied once into a cache
folder until it holds at least `--mb` MB (default 50). Both sides start from that
folder and end with a saved dataset of 2048-token rows:

- baseline, as the usual tutorials do it: read every file into a `Dataset` of texts,
  `.map(tokenize, batched=True)` with the transformers tokenizer (the kit's, as the
  published one no longer loads), append EOS, then `.map(group_texts)` concatenating
  everything into blocks (documents leak into each other), `save_to_disk`;
- ours: `prepare()` from the folder: file discovery and filtering, tokenization,
  EOS, splitting, best-fit packing with per-document positions, manifest, save.

Each side runs `--repeats` times from a cold output folder; medians are printed with
MB/s, tokens/s and the ratio. Command (from the repository root):

    .venv/bin/python bench/prep.py [--mb 50] [--repeats 3] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep.prepare import PrepConfig, prepare  # noqa: E402
from model import load_tokenizer  # noqa: E402

SEQ_LEN = 2048


def build_corpus(folder: Path, megabytes: int) -> tuple[list[Path], int]:
    """Copy site-packages .py files (sorted, non-empty, UTF-8) until `megabytes` MB."""
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        site = Path(sysconfig.get_paths()["purelib"])
        total = 0
        for source in sorted(site.rglob("*.py")):
            if total >= megabytes * 1_000_000:
                break
            data = source.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not data or "__pycache__" in source.parts:
                continue
            target = folder / source.relative_to(site)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            total += len(data)
        marker.write_text(str(total))
    files = sorted(p for p in folder.rglob("*.py"))
    return files, sum(p.stat().st_size for p in files)


def baseline(files: list[Path], tokenizer_dir: str, out: Path) -> int:
    """The tutorial recipe; returns the number of tokens."""
    from datasets import Dataset

    tokenizer = load_tokenizer(tokenizer_dir)
    texts = [p.read_text(encoding="utf-8") for p in files]
    data = Dataset.from_dict({"text": texts})

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [tokenizer.eos_token_id] for x in ids]}

    data = data.map(tokenize, batched=True, remove_columns=["text"])
    tokens = sum(len(x) for x in data["input_ids"])

    def group_texts(batch):
        joined = list(chain.from_iterable(batch["input_ids"]))
        usable = len(joined) // SEQ_LEN * SEQ_LEN
        blocks = [joined[i : i + SEQ_LEN] for i in range(0, usable, SEQ_LEN)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    data = data.map(group_texts, batched=True)
    data.save_to_disk(str(out))
    return tokens


def ours(corpus: Path, tokenizer_dir: str, out: Path) -> int:
    config = PrepConfig(out=str(out), tokenizer=tokenizer_dir, seq_len=SEQ_LEN, code=[str(corpus)])
    result = prepare(config, progress=False)
    return sum(s["tokens"] for s in result.manifest["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", default=str(Path(tempfile.gettempdir()) / "replit-prep-corpus"))
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "replit-code-v1-3b"))
    args = parser.parse_args()
    files, size = build_corpus(Path(args.corpus), args.mb)
    mb = size / 1e6
    print(f"corpus {args.corpus}: {len(files)} files, {mb:.1f} MB; rows of {SEQ_LEN} tokens")

    results: dict[str, list[tuple[float, int]]] = {"baseline (datasets.map)": [], "ours": []}
    for _ in range(args.repeats):
        for name, run in (
            ("baseline (datasets.map)", lambda out: baseline(files, args.tokenizer, out)),
            ("ours", lambda out: ours(Path(args.corpus), args.tokenizer, out)),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                tokens = run(Path(tmp) / "out")
                results[name].append((time.perf_counter() - start, tokens))
                print(f"  {name:<24} {results[name][-1][0]:7.2f} s  {tokens:,} tokens", flush=True)

    print(f"\n{'':<24} {'median s':>9} {'MB/s':>7} {'tokens/s':>11}")
    medians = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        tokens = runs[0][1]
        medians[name] = seconds
        print(f"{name:<24} {seconds:9.2f} {mb / seconds:7.2f} {tokens / seconds:11,.0f}")
    speedup = medians["baseline (datasets.map)"] / medians["ours"]
    print(
        f"\nours vs baseline: {speedup:.2f}x faster (target >= 2x); ours on {mb:.0f} MB: "
        f"{medians['ours']:.1f} s (target < 60 s)"
    )


if __name__ == "__main__":
    main()
