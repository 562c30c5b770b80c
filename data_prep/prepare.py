"""`prepare`: sources -> documents -> split -> tokens -> packed rows -> dataset on disk + manifest.

The output folder holds a `datasets.DatasetDict` (`train`, `validation`) written with
`save_to_disk`, and `manifest.json` beside it: what went in, what was skipped and why,
token and row counts, packing efficiency, the tokenizer's checksum and the settings.
A second run with the same inputs and settings finds the manifest's fingerprint and
reuses the folder; any change to a file, a setting or the tokenizer redoes it. The
folder is written under a temporary name (`.OUT.tmp-HOST-PID`), fsynced and swapped in at the
end, so an interrupted run never leaves a half-written dataset where a good one was; a
failed run removes its temporary folder, and those of killed runs are removed by the next
run. An exclusive lock (`.OUT.lock`, beside the folder) covers check-and-write, so of two
processes preparing one folder, one writes and the other waits and reuses its result.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import (
    Dataset,
    DatasetDict,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from data_prep.code import collect_code
from data_prep.document import Document, Skipped
from data_prep.files import (
    fsync_tree,
    is_disk_full,
    locked,
    remove_stale_temporaries,
    replace_folder,
    temporary_path,
)
from data_prep.fim import MIN_SEQ_LEN as FIM_MIN_SEQ_LEN
from data_prep.fim import FimSettings, document_rng, fim_pieces
from data_prep.instructions import Template, load_instructions
from data_prep.packing import Piece, chunk, pack
from data_prep.settings import SettingError, setting
from data_prep.tokens import encode_documents

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
OVERLONG = ("drop", "truncate", "split")


@dataclass
class PrepConfig:
    """What to prepare: a recipe's `data:` section, or the flags of `replit-ft prep`."""

    out: str | None = setting(
        None, "Folder of the prepared dataset (in a recipe: default OUTPUT_DIR/data).", path="path"
    )
    tokenizer: str | None = setting(
        None, "Tokenizer name or folder (in a recipe: default model.name).", path="path or hub id"
    )
    seq_len: int = setting(2048, "Tokens per row: the context trained at.", minimum=2)
    code: list[str] = setting([], "Code folders, git repos, files or globs.", path="path")
    include: list[str] = setting([], "Globs of files to take (default: the 20 languages).")
    exclude: list[str] = setting([], "Globs of files to leave out.")
    max_file_bytes: int = setting(1_000_000, "Larger files are skipped.", minimum=1)
    path_header: bool = setting(False, "Put each file's path in a comment on top.")
    follow_links: bool = setting(False, "Follow links that lead out of a code folder or glob base.")
    instructions: list[str] = setting(
        [], "Instruction files (jsonl/json/csv/parquet) or hub datasets.", path="path or hub id"
    )
    format: str = setting(
        "auto",
        "Instruction format.",
        choices=("auto", "alpaca", "prompt_completion", "messages", "text"),
    )
    template: dict[str, str] = setting({}, "Prompt template parts (see data_prep.instructions).")
    skip_bad: bool = setting(False, "Count malformed instruction records instead of failing.")
    overlong: str = setting(
        "drop",
        "Instruction examples longer than seq_len: drop them, truncate the response (the "
        "prompt stays whole), or split them into pieces.",
        choices=OVERLONG,
    )
    packed: bool = setting(True, "Best-fit pack documents into rows (else one per row).")
    validation_fraction: float = setting(
        0.05, "Share of documents held out for evaluation.", minimum=0, below=1
    )
    seed: int = setting(
        0, "Seed of the train/validation split and of fill-in-the-middle's cuts.", minimum=0
    )
    fim_rate: float = setting(
        0.0,
        "Share of code documents laid out for fill-in-the-middle (0: off; see data_prep.fim).",
        minimum=0,
        maximum=1,
    )
    fim_spm_rate: float = setting(
        0.5,
        "Share of the fill-in-the-middle documents in SPM order (the rest PSM).",
        minimum=0,
        maximum=1,
    )

    def check(self) -> None:
        """Rules across settings (each setting's own rule is on its field)."""
        if not self.code and not self.instructions:
            raise SettingError(
                "code", "nothing to prepare: give code paths and/or instruction files"
            )
        if self.fim_rate > 0 and self.seq_len < FIM_MIN_SEQ_LEN:
            raise SettingError(
                "fim_rate", f"needs seq_len >= {FIM_MIN_SEQ_LEN}, got {self.seq_len}"
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
    documents, examples, sources, skipped = collect(config)
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

    def wait(lock: Path) -> None:
        print(f"waiting for another process preparing {out} (lock {lock})", file=sys.stderr)

    with locked(out, on_busy=wait):
        remove_stale_temporaries(out, ("tmp", "old"))
        old = _read_manifest(out)
        if old is not None and old.get("fingerprint") == fingerprint:
            return Prepared(out, old, reused=True)
        if out.exists() and old is None and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out}: exists, is not empty and is not a prepared dataset")

        started = time.perf_counter()
        fim = None
        if config.fim_rate > 0:
            fim = FimSettings.for_tokenizer(tokenizer, config.fim_rate, config.fim_spm_rate)
        datasets, stats, overlong = _build(
            tokenizer, documents, examples, config, skipped, progress, fim
        )
        if not stats["train"]["rows"]:
            hint = " (data.overlong: truncate or split keeps them)" * bool(overlong["dropped"])
            raise ValueError(_nothing_left(sources, skipped) + hint)
        manifest = {
            "fingerprint": fingerprint,
            "sources": sources,
            "skipped": dict(sorted(skipped.items())),
            "skipped_files": dict(sorted(skipped.names.items())),
            "overlong": {"policy": config.overlong, **overlong},
            "splits": stats,
            "tokenizer": {"name": str(config.tokenizer), "sha256": tokenizer_sha},
            "settings": dataclasses.asdict(config),
            "fim": dataclasses.asdict(fim) if fim else None,
            "seconds": round(time.perf_counter() - started, 2),
        }
        _write(out, datasets, manifest, progress)
    return Prepared(out, manifest, reused=False)


def collect(config: PrepConfig) -> tuple[list[Document], list[bool], list[dict[str, Any]], Skipped]:
    """All documents of the config's sources, a report per source, and the skipped inputs.

    Also, per document, whether it is an instruction example (data.overlong applies) or code.
    """
    documents: list[Document] = []
    sources: list[dict[str, Any]] = []
    skipped = Skipped()
    if config.code:
        try:
            corpus = collect_code(
                config.code,
                include=config.include,
                exclude=config.exclude,
                max_file_bytes=config.max_file_bytes,
                path_header=config.path_header,
                follow_links=config.follow_links,
            )
        except (FileNotFoundError, PermissionError) as err:  # a path given, missing or locked
            raise type(err)(
                f"data.code: {err}: point data.code (or --code) at your code's folders, files "
                "or globs"
            ) from None
        documents += corpus.documents
        _add_skips(skipped, "code", corpus.skipped)
        sources.append(
            {
                "code": [str(p) for p in config.code],
                "files_seen": corpus.files_seen,
                "documents": len(corpus.documents),
            }
        )
    examples = [False] * len(documents)
    template = Template.from_dict(config.template)
    for source in config.instructions:
        try:
            found = load_instructions(
                source, format=config.format, template=template, skip_bad=config.skip_bad
            )
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data.instructions: {err}") from None
        documents += found.documents
        examples += [True] * len(found.documents)
        _add_skips(skipped, "instructions", found.skipped)
        sources.append(
            {"instructions": str(source), "format": found.format, "documents": len(found.documents)}
        )
    return documents, examples, sources, skipped


def _add_skips(into: Skipped, kind: str, found: Skipped) -> None:
    for reason, names in found.names.items():
        for name in names:
            into.add(f"{kind}: {reason}", name)


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


def _build(
    tokenizer,
    documents: list[Document],
    examples: list[bool],
    config: PrepConfig,
    skipped: Skipped,
    progress: bool,
    fim: FimSettings | None,
) -> tuple[DatasetDict, dict[str, dict[str, Any]], dict[str, int]]:
    """The packed splits, their statistics, and how many over-long examples were dropped,
    truncated or split (the dropped ones also go into `skipped`)."""
    splits = split_documents(documents, config.validation_fraction, config.seed)
    overlong = dict.fromkeys(("dropped", "truncated", "split"), 0)
    datasets, stats = {}, {}
    for name in SPLITS:
        docs = [(documents[i], examples[i]) for i in splits[name]]
        pieces, tokens, trained, kept = _tokenize(
            tokenizer, docs, config, skipped, overlong, progress, fim
        )
        rows = pack(pieces, config.seq_len, tokenizer.pad_token_id, packed=config.packed)
        n_rows = len(rows["input_ids"])
        datasets[name] = _to_dataset(rows)
        stats[name] = {
            "documents": kept,
            "pieces": len(pieces),
            "tokens": tokens,
            "trained_tokens": trained,
            "rows": n_rows,
            "packing_efficiency": round(tokens / (n_rows * config.seq_len), 4) if n_rows else 0,
            "fim_documents": sum(int(p.ids[0]) == fim.prefix_id for p in pieces) if fim else 0,
        }
    return DatasetDict(datasets), stats, overlong


def _tokenize(
    tokenizer,
    docs: list[tuple[Document, bool]],
    config: PrepConfig,
    skipped: Skipped,
    overlong: dict[str, int],
    progress: bool,
    fim: FimSettings | None,
) -> tuple[list[Piece], int, int, int]:
    """Pieces of the documents, their tokens and trained tokens, and how many documents remain.

    Code longer than a row is cut into row-sized pieces. An instruction example longer than a
    row follows `config.overlong`: dropped; truncated (the prompt whole, the response cut, no
    EOS; dropped when the prompt alone fills the row); or split into pieces like code.
    With `fim`, code is laid out by data_prep.fim, and no text becomes a sentinel id.
    """
    seq_len = config.seq_len
    pieces: list[Piece] = []
    tokens = trained_tokens = kept = 0
    reserved = fim.sentinel_ids if fim else ()
    encoded = encode_documents(
        tokenizer, [doc for doc, _ in docs], progress=progress, reserved=reserved
    )
    for (doc, example), (ids, trained) in zip(docs, encoded, strict=True):
        if example and len(ids) > seq_len:
            if config.overlong == "split":
                overlong["split"] += 1
            elif config.overlong == "truncate" and trained[seq_len - 1]:
                ids, trained = ids[:seq_len], trained[:seq_len]
                overlong["truncated"] += 1
            else:
                reason = (
                    "longer than seq_len" if config.overlong == "drop" else "prompt fills seq_len"
                )
                skipped.add(f"instructions: {reason}", doc.name)
                overlong["dropped"] += 1
                continue
        if fim is not None and not example:
            rng = document_rng(config.seed, doc.name)
            new = fim_pieces(tokenizer, doc.completion, ids, fim, seq_len, rng)
        else:
            new = chunk(ids, trained, seq_len)
        pieces += new
        tokens += sum(len(p.ids) for p in new)
        trained_tokens += sum(int(p.trained.sum()) for p in new)
        kept += 1
    return pieces, tokens, trained_tokens, kept


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


@contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """datasets' own progress bars (save_to_disk's) on or off, as they were afterwards."""
    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def _write(out: Path, data: DatasetDict, manifest: dict[str, Any], progress: bool) -> None:
    """Write beside `out`, fsync, then swap it in: a crash leaves the old output or none.

    On any failure the temporary folder is removed; a full disk is an error saying so.
    """
    tmp = temporary_path(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _datasets_progress(progress):
            # One shard per split even when a split is empty: datasets cannot reload zero shards.
            data.save_to_disk(str(tmp), num_shards={name: 1 for name in data})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and is_disk_full(err):
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device holding {out.parent} while writing the dataset "
                f"(nothing was changed; free space there or set another data.out / --out)",
            ) from err
        raise
    try:
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nothing_left(sources: list[dict[str, Any]], skipped: Skipped) -> str:
    seen = ", ".join(
        f"{s.get('files_seen', 0)} files under {', '.join(s['code'])}"
        if "code" in s
        else f"{s['instructions']} ({s['format']})"
        for s in sources
    )
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "none"
    return f"no documents left to train on: read {seen}; skipped: {reasons}"
