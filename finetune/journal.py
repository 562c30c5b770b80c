"""The journal of an eval's generation: completions written to disk batch by batch, so that a
crash or kill loses at most the batch in flight and a rerun generates only what is missing.

`eval humaneval` and `eval infill` keep it as OUT/journal.jsonl while they generate; it is
removed once results.json is written. JSON lines:

    {"job": JOB, "settings": {...}, "prompts": SHA256, "files": {DIR: DIGEST}}    first line
    {"job": JOB, "index": I, "completion": TEXT}                         one per completion

`index` is the prompt's place in the full prompt list, which the settings fix (the
benchmark's problems in their order). JOB is a digest of everything that makes completions
comparable: the settings as results.json records them (model or adapter, quantization,
compute dtype, attention backend, decoding, limit, benchmark), the prompt list itself (and the
suffixes, for infilling) and, for each model or adapter folder named, the names, sizes and
modification times of its weight and config files (a retrained adapter at the same path is
another model; a model named by hub id has no folder to look at, and training's own eval puts
the adapter's sha256 in its settings instead). Every completion line carries JOB, so a line is
never taken for another job's.

Batches are the unit. The caller cuts the prompts into batches that the settings fix (longest
first, `batch_size` each); a batch counts as done when all its completions are in the journal,
and each batch's lines go in one append, flushed and fsynced before the next batch starts. A
crash during an append leaves a prefix of it: maybe some of the batch's lines, and a cut last
line. The cut line is ignored, and cut off before anything is appended; the batch, not all on
disk, is generated again whole, so that every batch is generated as an uninterrupted run
generates it (its later lines count). Any other line that is not this job's is an error
naming the file and line.

A journal of other settings is refused, naming what differs and how to start over (delete
it, or choose another --out): it holds completions that took long to make, and a rerun with a
flag changed by mistake (another --batch-size, a forgotten --quantization) must not throw
them away. Neither is it mixed in: a results.json never holds completions of two settings.
`restart=True` replaces such a journal instead, for training's own eval, whose adapter may
differ after a resumed run that still has to end.

Randomness (temperature > 0): each batch is generated with a seed of its own, derived from
the run's seed and the batch's number, so which batches ran before it does not matter: a
resumed run draws what an uninterrupted run draws, and its completions are the same as far as
the device's arithmetic is deterministic (on CPU they are; on CUDA torch does not promise
bitwise equal kernels from one process to the next, so a sampled completion may differ, and
it is still a sample of the same settings).

One process at a time: `exclusive(out)` holds OUT/.journal.jsonl.lock (flock; the kernel
drops it when its holder dies, even by SIGKILL) while the eval runs; a second process
evaluating into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data_prep.files import append_durably, fsync, locked, write_atomic

JOURNAL = "journal.jsonl"
CONFIGS = ("config.json", "adapter_config.json")  # with the weights, what makes a model


@contextmanager
def exclusive(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of the eval folder `out` while inside; refuse if another process holds it."""
    out = Path(out)

    def refuse(lock: Path) -> None:
        raise OSError(
            f"another process is evaluating into {out} (it holds {lock}): wait for it to end, "
            "or choose another --out"
        )

    with locked(out / JOURNAL, on_busy=refuse):
        yield


class Journal:
    """The completions of one job in `out`, as written so far. Use inside `exclusive(out)`.

    `settings` are the job's settings as results.json records them; `files` the model and
    adapter paths it was given (None and hub ids are skipped).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        settings: dict[str, Any],
        *,
        files: Sequence[str | os.PathLike | None] = (),
        restart: bool = False,
    ):
        self.path = Path(out) / JOURNAL
        self.settings = json.loads(json.dumps(settings))  # as read back: lists, not tuples
        digests = {str(f): _folder_digest(Path(f)) for f in files if f is not None}
        self.files = {f: digest for f, digest in digests.items() if digest is not None}
        self.restart = restart
        self.job = ""
        self.resumed = 0  # completions taken from the journal, not generated

    def resume(
        self,
        prompts: Sequence[str],
        suffix: Sequence[str] | None,
        batches: Sequence[Sequence[int]],
    ) -> dict[int, str]:
        """The completions of the `batches` that the journal holds whole, by prompt index.

        Starts the journal when there is none (or, with `restart`, over one of other
        settings); refuses one of other settings; cuts off a last line a crash cut.
        """
        header = {
            "settings": self.settings,
            "prompts": hashlib.sha256(json.dumps([prompts, suffix]).encode()).hexdigest(),
            "files": self.files,
        }
        self.job = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]
        header = {"job": self.job, **header}
        lines, whole = self._read()
        try:
            written = self._written(lines, header, len(prompts))
        except ValueError:
            if not self.restart:
                raise
            lines = []
        if not lines:
            write_atomic(self.path, json.dumps(header) + "\n")
            return {}
        if whole < self.path.stat().st_size:
            os.truncate(self.path, whole)
            fsync(self.path)
        done = {
            i: written[i] for batch in batches if all(i in written for i in batch) for i in batch
        }
        self.resumed = len(done)
        return done

    def append(self, completions: dict[int, str]) -> None:
        """Write one batch's completions, on disk when this returns."""
        lines = (
            json.dumps({"job": self.job, "index": i, "completion": text}) + "\n"
            for i, text in completions.items()
        )
        append_durably(self.path, "".join(lines))

    def remove(self) -> None:
        """Remove the journal (once what it served is written)."""
        self.path.unlink(missing_ok=True)
        fsync(self.path.parent)

    def _written(self, lines: list[bytes], header: dict[str, Any], count: int) -> dict[int, str]:
        """The completions in `lines`, by index; ValueError if they are not this job's."""
        if not lines:
            return {}
        old = _parse(f"{self.path}:1", lines[0])
        if not isinstance(old.get("job"), str) or not isinstance(old.get("settings"), dict):
            raise ValueError(
                f"{self.path}:1: not a journal's first line; delete the file to start over"
            )
        if old["job"] != self.job:
            raise ValueError(
                f"{self.path} holds completions generated with other settings "
                f"({'; '.join(_differences(old, header))}): rerun with those settings to "
                f"resume, or delete {self.path} (or choose another --out) to start over"
            )
        written = {}
        for number, line in enumerate(lines[1:], 2):
            where = f"{self.path}:{number}"
            record = _parse(where, line)
            index, text = record.get("index"), record.get("completion")
            if record.get("job") != self.job or type(index) is not int or not isinstance(text, str):
                raise ValueError(
                    f"{where}: not a completion of this journal's job; delete the file to "
                    "start over"
                )
            if not 0 <= index < count:
                raise ValueError(f"{where}: index {index} is not a prompt's (0 .. {count - 1})")
            written[index] = text
        return written

    def _read(self) -> tuple[list[bytes], int]:
        """The journal's complete lines, and the bytes they take: what follows the last
        newline is what a crash cut off."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        whole = data.rfind(b"\n") + 1
        return data[:whole].split(b"\n")[:-1], whole


def _parse(where: str, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not valid JSON ({err}); delete the file to start over") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object; delete the file to start over")
    return record


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two journals' first lines, for a person to read."""
    found = []
    before, now = old["settings"], new["settings"]
    for key in sorted(before.keys() | now.keys()):
        if (key in before, before.get(key)) != (key in now, now.get(key)):
            found.append(f"{key}: {before.get(key)!r} then, {now.get(key)!r} now")
    if old.get("prompts") != new["prompts"]:
        found.append("the prompts")
    then = old.get("files") if isinstance(old.get("files"), dict) else {}
    for folder in sorted(then.keys() | new["files"].keys()):
        if then.get(folder) != new["files"].get(folder):
            found.append(f"the files in {folder} (changed since)")
    return found or ["the journal's digest"]


def _folder_digest(folder: Path) -> str | None:
    """A digest of the names, sizes and modification times of the weight and config files
    directly in `folder` (None for what is no folder: a hub id). Cheap: no file is read, and
    what an eval writes there (an --out inside the model's folder) does not count."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name in CONFIGS or path.suffix in (".safetensors", ".bin")):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
