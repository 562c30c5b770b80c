"""Durable files, for everything the kit writes: whole or not at all, on disk, readable.

One place for the three habits every writer needs: write under a temporary name and
rename (a crash or kill leaves the old file or none, never half of one), flush to disk
before the rename is trusted (fsync of the file, then of its folder), and give files the
mode a plain `open()` would (0644 under umask 022: `mkstemp` and safetensors write 0600).
Also: appending to a file durably (a log that grows), one lock per output so that two
processes never write it at once, and one test of a failed write for lack of space, which
libraries report in several ways.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data`, flushed to disk, mode 0666 & ~umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)  # the rename itself


def append_durably(path: str | os.PathLike, data: str) -> None:
    """Append `data` to `path` (created if missing, mode 0666 & ~umask) and flush it to disk.

    What a crash or kill can leave is the earlier content plus a prefix of `data`: readers of
    such a log must expect a cut last line.
    """
    path = Path(path)
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    if created:
        fsync(path.parent)  # the new file's name


@contextmanager
def locked(target: Path, on_busy: Callable[[Path], None]) -> Iterator[None]:
    """Hold an exclusive lock on `target` (the file `.NAME.lock` beside it) while inside.

    flock, not a lock folder: the kernel releases it when its holder dies, even by SIGKILL.
    When another process (or another open of the file) holds it, `on_busy(lock file)` is
    called first: it raises to refuse, or returns to wait for the lock. The holder removes
    the file before letting go, so that nothing is left beside `target` (a killed holder
    leaves it, for the next one to reuse); whoever got the lock of a file removed meanwhile
    takes the lock of the path again. Where the lock file cannot be created (a folder this
    process may not write to) there is nothing to lock: a process that cannot write there
    can only read.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    while True:
        try:
            file = open(lock, "a")
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EROFS):
                raise
            yield
            return
        try:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_busy(lock)
                fcntl.flock(file, fcntl.LOCK_EX)
            if _is_file_at(file, lock):
                break
        except BaseException:
            file.close()
            raise
        file.close()
    with file:  # closing it releases the lock
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def refuse_second(out: Path, writer: str) -> Callable[[Path], None]:
    """`locked`'s `on_busy` for an output that one process writes at a time: refuse, naming
    `out`, the `writer` ("merge", "export") that holds it and the way on."""

    def refuse(lock: Path) -> None:
        raise FileExistsError(
            f"{out}: another {writer} is writing it (it holds {lock}); wait for it to end, or "
            "choose another --out"
        )

    return refuse


def _is_file_at(file, path: Path) -> bool:
    """Whether the open `file` is still the file at `path` (not removed or replaced)."""
    try:
        at = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(file.fileno())
    return (mine.st_dev, mine.st_ino) == (at.st_dev, at.st_ino)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, and `folder` itself, to disk."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync(path)
    fsync(folder)


def readable_by_others(folder: Path) -> None:
    """Give every file under `folder` the mode a plain `open()` would (0644 under umask 022)."""
    mode = 0o666 & ~umask()
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(mode)


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_disk_full(err: BaseException | None) -> bool:
    """Whether a failed write, or an error it was raised from, ran out of space.

    Python reports ENOSPC (or EDQUOT), torch's zip writer "file write failed", safetensors
    "No space left on device (os error 28)"; libraries often wrap one in another.
    """
    while err is not None:
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "os error 28" in text:
            return True
        if isinstance(err, RuntimeError) and "file write failed" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def temporary_path(target: Path, kind: str) -> Path:
    """`.NAME.KIND-HOST-PID` beside `target`: this process's temporary, known later by name."""
    return target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there only once `tmp` is whole.

    `out`'s previous content waits at `.OUT.old-HOST-PID` between the two renames; a
    process killed there leaves `out` missing, and `remove_stale_temporaries(out, ("old",))`
    puts the previous content back.
    """
    old = temporary_path(out, "old") if out.exists() or out.is_symlink() else None
    if old is not None:
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(target: Path, kinds: tuple[str, ...]) -> list[Path]:
    """Remove the temporaries of `kinds` beside `target` left by processes that were killed.

    Only this host's (a shared file system may hold another host's, alive) and only of
    processes that no longer run; `.NAME.KIND-PID`, without a host, counts as this host's.
    An "old" one (`replace_folder`'s) while `target` is missing is `target`'s previous
    content, interrupted on its way out: it goes back to `target` instead. Returns what was
    removed.
    """
    host, prefix, removed = socket.gethostname(), f".{target.name}.", []
    for entry in sorted(target.parent.iterdir()) if target.parent.is_dir() else ():
        kind, dash, owner = entry.name.removeprefix(prefix).partition("-")
        owner_host, _, pid = owner.rpartition("-")
        if not entry.name.startswith(prefix) or kind not in kinds or not dash:
            continue
        if owner_host in ("", host) and pid.isdigit() and not _alive(int(pid)):
            if kind == "old" and not (target.exists() or target.is_symlink()):
                entry.rename(target)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            else:
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
