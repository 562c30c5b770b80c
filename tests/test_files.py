"""data_prep.files: a folder swapped in whole, and what a killed swap leaves put right."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.files import remove_stale_temporaries, replace_folder


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_replace_folder_swaps_in_the_new_content_and_leaves_nothing_beside(tmp_path):
    out = folder(tmp_path / "model", "before")
    replace_folder(folder(tmp_path / "new", "after"), out)
    assert (out / "weights").read_text() == "after"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_swap_puts_the_previous_content_back(tmp_path):
    out = folder(tmp_path / "model", "before")
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / "missing", out)
    assert (out / "weights").read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_swap_killed_between_its_renames_is_undone_not_deleted(tmp_path, dead_pid):
    """The previous content moved aside, the new one not in: the next run restores it."""
    aside = folder(tmp_path / f".model.old-{socket.gethostname()}-{dead_pid}", "before")
    out = tmp_path / "model"
    assert remove_stale_temporaries(out, ("partial", "old")) == []
    assert (out / "weights").read_text() == "before" and not aside.exists()


def test_a_stale_old_folder_beside_its_target_is_removed(tmp_path, dead_pid):
    out = folder(tmp_path / "model", "now")
    aside = folder(tmp_path / f".model.old-{dead_pid}", "before")
    assert remove_stale_temporaries(out, ("old",)) == [aside]
    assert (out / "weights").read_text() == "now" and not aside.exists()


def test_a_living_process_keeps_its_old_folder(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        aside = folder(tmp_path / f".model.old-{socket.gethostname()}-{alive.pid}", "before")
        assert remove_stale_temporaries(tmp_path / "model", ("old",)) == []
        assert aside.is_dir() and not (tmp_path / "model").exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_lock_refuses_a_second_holder_and_leaves_no_file(tmp_path):
    from data_prep.files import locked

    target = tmp_path / "out"

    def refuse(lock: Path) -> None:
        raise RuntimeError(f"busy: {lock.name}")

    with locked(target, on_busy=refuse):
        assert (tmp_path / ".out.lock").is_file()
        with pytest.raises(RuntimeError, match="busy: .out.lock"):
            with locked(target, on_busy=refuse):
                pass
    assert list(tmp_path.iterdir()) == []


def test_a_waiter_whose_lock_file_was_removed_takes_the_new_one(tmp_path):
    """The holder removes the file as it lets go: whoever waited on the removed file must
    lock the path again, or a third process could hold the lock beside it."""
    from contextlib import ExitStack

    from data_prep.files import locked

    target, first = tmp_path / "out", ExitStack()
    first.enter_context(locked(target, on_busy=lambda lock: None))
    seen = []

    def holder_leaves(lock: Path) -> None:  # B waits; meanwhile A ends
        seen.append(lock.stat().st_ino)
        first.close()

    with locked(target, on_busy=holder_leaves):
        assert len(seen) == 1
        assert (tmp_path / ".out.lock").is_file()  # B's own file, not the removed one
        with pytest.raises(RuntimeError):
            with locked(target, on_busy=lambda lock: (_ for _ in ()).throw(RuntimeError())):
                pass
    assert list(tmp_path.iterdir()) == []
