"""`prepare`: sources -> documents -> split -> tokens -> packed rows -> dataset on disk + manifest.

The output folder holds a `datasets.DatasetDict` (`train`, `validation`) written with
`save_to_disk`, and `manifest.json` beside it: what went in, what was skipped and why,
token and row counts, packing efficiency, the tokenizer's checksum and the settings.
A second run with the same inputs and settings finds the manifest's fingerprint and
reuses the folder; any change to a file, a setting or the tokenizer redoes it. The
folder is written under a temporary name and swapped in at the end, so an interrupted
run never leaves a half-written dataset where a good one was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict

from data_prep.code import collect_code
from data_prep.document import Document
from data_prep.instructions import Template, load_instructions
from data_prep.packing import Piece, chunk, pack
from data_prep.settings import SettingError, setting
from data_prep.tokens import encode_documents

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


@dataclass
class PrepConfig:
    """What to prepare: a recipe's `data:` section, or the flags of `replit-ft prep`."""

    out: str | None = setting(
        None, "Folder of the prepared dataset (in a recipe: default OUTPUT_DIR/data).", path=True
    )
    tokenizer: str | None = setting(
        None, "Tokenizer name or folder (in a recipe: default model.name).", path=True
    )
    seq_len: int = setting(2048, "Tokens per row: the context trained at.", minimum=2)
    code: list[str] = setting([], "Code folders, git repos, files or globs.", path=True)
    include: list[str] = setting([], "Globs of files to take (default: the 20 languages).")
    exclude: list[str] = setting([], "Globs of files to leave out.")
    max_file_bytes: int = setting(1_000_000, "Larger files are skipped.", minimum=1)
    path_header: bool = setting(False, "Put each file's path in a comment on top.")
    instructions: list[str] = setting(
        [], "Instruction files (jsonl/json/csv/parquet) or hub datasets.", path=True
    )
    format: str = setting(
        "auto",
        "Instruction format.",
        choices=("auto", "alpaca", "prompt_completion", "messages", "text"),
    )
    template: dict[str, str] = setting({}, "Prompt template parts (see data_prep.instructions).")
    skip_bad: bool = setting(False, "Count malformed instruction records instead of failing.")
    packed: bool = setting(True, "Best-fit pack documents into rows (else one per row).")
    validation_fraction: float = setting(
        0.05, "Share of documents held out for evaluation.", minimum=0, below=1
    )
    seed: int = setting(0, "Seed of the train/validation split.", minimum=0)

    def check(self) -> None:
        """Rules across settings (each setting's own rule is on its field)."""
        if not self.code and not self.instructions:
            raise SettingError(
                "code", "nothing to prepare: give code paths and/or instruction files"
            )


@dataclass
class Prepared:
    """Where the dataset is, its manifest, and whether an earlier run's output was reused."""

    path: Path
    manifest: dict[str, Any]
    reused: bool

    def load(self) -> DatasetDict:
        return DatasetDict.load_from_disk(str(self.path))


def prepare(config: PrepConfig, *, progress: bool = True, expect: str | None = None) -> Prepared:
    """Prepare (or reuse) the packed dataset `config` describes.

    expect: the fingerprint the data must have (a resumed run's); other data is an error,
    raised before anything is written.
    """
    from model import load_tokenizer

    if not config.out:
        raise ValueError("say where to write the dataset: --out DIR (or data.out)")
    if not config.tokenizer:
        raise ValueError("say which tokenizer to use: --tokenizer NAME_OR_PATH (or data.tokenizer)")
    out = Path(config.out)
    documents, sources, skipped = collect(config)
    if not documents:
        raise ValueError(_nothing_left(sources, skipped))
    tokenizer = load_tokenizer(config.tokenizer)
    tokenizer_sha = _tokenizer_checksum(tokenizer)
    fingerprint = _fingerprint(config, tokenizer_sha, documents)
    if expect is not None and fingerprint != expect:
        raise ValueError(
            f"the data changed since the run started (fingerprint {expect[:12]} then, "
            f"{fingerprint[:12]} now: a file, a data setting or the tokenizer differs); a resumed "
            "run must read the same data. Restore it, or start a new run."
        )
    old = _read_manifest(out)
    if old is not None and old.get("fingerprint") == fingerprint:
        return Prepared(out, old, reused=True)
    if out.exists() and old is None and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists, is not empty and is not a prepared dataset")

    started = time.perf_counter()
    splits = split_documents(documents, config.validation_fraction, config.seed)
    datasets, stats = {}, {}
    for name in SPLITS:
        docs = [documents[i] for i in splits[name]]
        pieces, tokens, trained = _tokenize(tokenizer, docs, config.seq_len, progress)
        rows = pack(pieces, config.seq_len, tokenizer.pad_token_id, packed=config.packed)
        n_rows = len(rows["input_ids"])
        datasets[name] = _to_dataset(rows)
        stats[name] = {
            "documents": len(docs),
            "pieces": len(pieces),
            "tokens": tokens,
            "trained_tokens": trained,
            "rows": n_rows,
            "packing_efficiency": round(tokens / (n_rows * config.seq_len), 4) if n_rows else 0,
        }
    manifest = {
        "fingerprint": fingerprint,
        "sources": sources,
        "skipped": dict(sorted(skipped.items())),
        "splits": stats,
        "tokenizer": {"name": str(config.tokenizer), "sha256": tokenizer_sha},
        "settings": dataclasses.asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write(out, DatasetDict(datasets), manifest)
    return Prepared(out, manifest, reused=False)


def collect(config: PrepConfig) -> tuple[list[Document], list[dict[str, Any]], Counter[str]]:
    """All documents of the config's sources, a report per source, and skips by reason."""
    documents: list[Document] = []
    sources: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    if config.code:
        corpus = collect_code(
            config.code,
            include=config.include,
            exclude=config.exclude,
            max_file_bytes=config.max_file_bytes,
            path_header=config.path_header,
        )
        documents += corpus.documents
        skipped.update({f"code: {k}": v for k, v in corpus.skipped.items()})
        sources.append(
            {
                "code": [str(p) for p in config.code],
                "files_seen": corpus.files_seen,
                "documents": len(corpus.documents),
            }
        )
    template = Template.from_dict(config.template)
    for source in config.instructions:
        found = load_instructions(
            source, format=config.format, template=template, skip_bad=config.skip_bad
        )
        documents += found.documents
        skipped.update({f"instructions: {k}": v for k, v in found.skipped.items()})
        sources.append(
            {"instructions": str(source), "format": found.format, "documents": len(found.documents)}
        )
    return documents, sources, skipped


def split_documents(documents: list[Document], fraction: float, seed: int) -> dict[str, list[int]]:
    """Document indices for train and validation: a seeded shuffle, each split in input order.

    With a non-zero fraction and at least two documents, validation gets at least one.
    """
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_val = round(fraction * len(order))
    if fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return {"validation": sorted(order[:n_val]), "train": sorted(order[n_val:])}


def _tokenize(
    tokenizer, documents: list[Document], seq_len: int, progress: bool
) -> tuple[list[Piece], int, int]:
    pieces: list[Piece] = []
    tokens = trained_tokens = 0
    for ids, trained in encode_documents(tokenizer, documents, progress=progress):
        pieces += chunk(ids, trained, seq_len)
        tokens += len(ids)
        trained_tokens += int(trained.sum())
    return pieces, tokens, trained_tokens


def _to_dataset(rows: dict[str, np.ndarray]) -> Dataset:
    """Rows as fixed-length int32 lists, built in Arrow without a Python list per token."""
    columns = {}
    for name, array in rows.items():
        flat = pa.array(array.reshape(-1), type=pa.int32())
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    return Dataset(pa.table(columns))


def _tokenizer_checksum(tokenizer) -> str:
    """sha256 of the SentencePiece model the ids come from."""
    return hashlib.sha256(Path(tokenizer.vocab_file).read_bytes()).hexdigest()


def _fingerprint(config: PrepConfig, tokenizer_sha: str, documents: list[Document]) -> str:
    """A hash of everything the rows depend on: settings, tokenizer and every document."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "out"}
    digest = hashlib.sha256(json.dumps([settings, tokenizer_sha], sort_keys=True).encode())
    for doc in documents:
        for part in (doc.name, doc.prompt, doc.completion):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not all((out / split).is_dir() for split in SPLITS):
        return None
    return manifest


def _write(out: Path, data: DatasetDict, manifest: dict[str, Any]) -> None:
    """Write beside `out`, then swap it in: a crash leaves the old output or none."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # One shard per split even when a split is empty: datasets cannot reload zero shards.
    data.save_to_disk(str(tmp), num_shards={name: 1 for name in data})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _nothing_left(sources: list[dict[str, Any]], skipped: Counter[str]) -> str:
    seen = ", ".join(
        f"{s.get('files_seen', 0)} files under {', '.join(s['code'])}"
        if "code" in s
        else f"{s['instructions']} ({s['format']})"
        for s in sources
    )
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "none"
    return f"no documents left to train on: read {seen}; skipped: {reasons}"
