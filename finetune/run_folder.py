"""The run folder (`train.output_dir`): its layout, its checkpoints, and the adapter's record.

    recipe.yaml     the resolved recipe the run was started with (resume reads it back)
    run.json        what else fixes the run: the data's fingerprint, the number of processes
    data/           the packed dataset, unless `data.out` points elsewhere
    checkpoint-N/   Trainer's checkpoint at step N; complete once `complete.json` is in it
    tensorboard/    TensorBoard logs
    metrics.json    the summary and the log history, at the end
    loss.png        train and evaluation loss per step, at the end
    humaneval/      HumanEval samples and results, with `train.eval_humaneval`
    adapter/        the trained LoRA adapter (peft) with `replit_ft.json`, its own record
    .train.lock     held by the launch training here (flock: freed when it ends, however)

This module is the one place that knows these names, what makes a checkpoint complete,
and what may be removed: a fresh run refuses a folder that holds an earlier run, and
`overwrite` removes only what a run writes (never the prepared data, never a file it
does not know).

A checkpoint is complete when every file in it is on disk (fsync) and `complete.json`,
written last, lists each file with its size and sha256. A checkpoint without it, or
whose files no longer match it, is skipped with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.files import fsync, locked, write_atomic

RECIPE = "recipe.yaml"
RUN_INFO = "run.json"
DATA = "data"
METRICS = "metrics.json"
PLOT = "loss.png"
TENSORBOARD = "tensorboard"
ADAPTER = "adapter"
HUMANEVAL = "humaneval"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
SEAL = "complete.json"
RECORD = "replit_ft.json"  # in an adapter or merged folder: how it was trained
_LOCKED = "train"  # data_prep.files.locked keeps the lock of a path beside it, as LOCK
LOCK = f".{_LOCKED}.lock"

_RUN_FILES = (RECIPE, RUN_INFO, METRICS, PLOT, TENSORBOARD, ADAPTER, HUMANEVAL)
# write_atomic's temporary files, left by a run that was killed while writing one
_TEMPORARY = re.compile(r"\.(recipe\.yaml|run\.json|metrics\.json|loss\.png)\..+\.tmp")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names it and the ways on."""


@dataclass(frozen=True)
class RunFolder:
    """Paths and rules of one run folder."""

    path: Path

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE

    @property
    def info(self) -> Path:
        return self.path / RUN_INFO

    @property
    def data(self) -> Path:
        return self.path / DATA

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def plot(self) -> Path:
        return self.path / PLOT

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def humaneval(self) -> Path:
        return self.path / HUMANEVAL

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest step first, complete or not."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
        return sorted(found, key=_step)

    def holds_run(self) -> bool:
        """Whether an earlier run (started, finished or killed) left anything here."""
        return any((self.path / name).exists() for name in _RUN_FILES) or bool(self.checkpoints())

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder's lock while inside; refuse if another launch trains here."""

        def refuse(lock: Path) -> None:
            raise RunFolderError(
                f"train.output_dir {self.path}: another launch is training here (it holds "
                f"{lock}); wait for it to end, or choose another train.output_dir"
            )

        self._refuse_a_file()  # before the lock makes the folder
        with locked(self.path / _LOCKED, on_busy=refuse):
            yield

    def check_fresh(self, overwrite: bool) -> None:
        """Refuse to start a fresh run over an earlier one (or over files a run did not write)."""
        self._refuse_a_file()
        if not self.path.exists():
            return
        foreign = sorted(p.name for p in self.path.iterdir() if not self._owns(p))
        if foreign:
            raise RunFolderError(
                f"train.output_dir {self.path} holds {', '.join(foreign[:5])}, which no run "
                "writes (and so train.overwrite=true would not remove); move them out of it, or "
                "choose an empty or new train.output_dir"
            )
        if self.holds_run() and not overwrite:
            raise RunFolderError(
                f"train.output_dir {self.path} holds an earlier run; continue it with "
                "train.resume=true, or replace it with train.overwrite=true (the prepared "
                "data is kept)"
            )

    def _refuse_a_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"train.output_dir {self.path} exists and is not a folder")

    def clear(self) -> None:
        """Remove an earlier run's files (what `overwrite` replaces); the data stays."""
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if _is_data(entry.name) or entry.name == LOCK or not self._owns(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _owns(self, entry: Path) -> bool:
        return (
            entry.name in (*_RUN_FILES, LOCK)
            or _is_data(entry.name)
            or bool(CHECKPOINT.fullmatch(entry.name))
            or bool(_TEMPORARY.fullmatch(entry.name))
        )

    def newest_complete_checkpoint(self, say: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that is complete; `say` is told why each newer one was skipped."""
        for checkpoint in reversed(self.checkpoints()):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            say(f"skipping {checkpoint.name}: {problem}")
        return None

    def rotate(self, keep: int) -> None:
        """Keep the newest `keep` sealed checkpoints; older ones and unsealed ones go.

        Called after each save, so it looks for the seal only: hashing every kept
        checkpoint's files again at each save is the resume's job (`checkpoint_problem`).
        """
        checkpoints = self.checkpoints()
        complete = [c for c in checkpoints if (c / SEAL).is_file()]
        newest = _step(complete[-1]) if complete else -1
        for checkpoint in checkpoints:
            if (checkpoint in complete and checkpoint not in complete[-keep:]) or (
                checkpoint not in complete and _step(checkpoint) < newest
            ):
                shutil.rmtree(checkpoint, ignore_errors=True)

    def drop_after(self, checkpoint: Path | None) -> list[Path]:
        """Remove checkpoints newer than `checkpoint` (a resumed run writes them again)."""
        limit = -1 if checkpoint is None else _step(checkpoint)
        dropped = [c for c in self.checkpoints() if _step(c) > limit]
        for c in dropped:
            shutil.rmtree(c)
        return dropped


def _is_data(name: str) -> bool:
    """`data/`, or what prep keeps beside it: its lock `.data.lock` and its temporary folders
    `.data.KIND-HOST-PID` (data_prep.prepare), which may belong to a prep still running."""
    return name == DATA or name.startswith(f".{DATA}.")


def _step(checkpoint: Path) -> int:
    return int(CHECKPOINT.fullmatch(checkpoint.name).group(1))


def seal_checkpoint(checkpoint: Path) -> None:
    """Flush every file of `checkpoint` to disk, then write `complete.json` listing them."""
    files = {}
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != SEAL):
        fsync(file)
        files[file.relative_to(checkpoint).as_posix()] = _file_digest(file)
    write_json(checkpoint / SEAL, {"files": files})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (naming the file), or None when it is complete."""
    seal = checkpoint / SEAL
    try:
        files = json.loads(seal.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return f"{seal.name} is missing (the run stopped while writing it)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{seal} is unreadable"
    for name, expected in files.items():
        file = checkpoint / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected.get("size"):
            return f"{file} has {file.stat().st_size} bytes, {expected.get('size')} were written"
        if _file_digest(file)["sha256"] != expected.get("sha256"):
            return f"{file} changed since it was written (sha256 differs)"
    return None


def _file_digest(file: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return {"size": file.stat().st_size, "sha256": digest.hexdigest()}


def write_json(file: Path, data: Any) -> None:
    """Write JSON whole or not at all (data_prep.files.write_atomic)."""
    write_atomic(file, json.dumps(data, indent=2) + "\n")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; anything else is an error naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """`replit_ft.json` in an adapter or merged folder: what it was trained from and at."""
    write_json(folder / RECORD, record)


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `replit_ft.json` of an adapter or merged folder, or None where there is none."""
    file = Path(folder) / RECORD
    return read_json(file) if file.is_file() else None
