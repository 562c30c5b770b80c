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
