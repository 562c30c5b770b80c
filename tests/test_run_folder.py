"""The run folder: what counts as an earlier run, what overwrite removes, sealed checkpoints."""

from __future__ import annotations

import json

import pytest

from finetune.run_folder import (
    RunFolder,
    RunFolderError,
    checkpoint_problem,
    read_record,
    seal_checkpoint,
)


def fake_checkpoint(run: RunFolder, step: int, sealed: bool = True):
    folder = run.path / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("optimizer.pt", "trainer_state.json", "rng_state.pth"):
        (folder / name).write_bytes(bytes(range(256)) * (step + 1))
    if sealed:
        seal_checkpoint(folder)
    return folder


def test_only_prepared_data_lets_a_fresh_run_start(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.check_fresh(overwrite=False)  # missing: fine
    (run.path / "data").mkdir(parents=True)
    run.check_fresh(overwrite=False)  # `replit-ft prep RECIPE` wrote the data first: fine
    fake_checkpoint(run, 2)
    with pytest.raises(
        RunFolderError, match=r"holds an earlier run; continue it with train\.resume"
    ):
        run.check_fresh(overwrite=False)
    run.check_fresh(overwrite=True)


def test_overwrite_never_removes_what_no_run_writes(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "thesis.tex").write_text("years of work")
    fake_checkpoint(run, 2)
    with pytest.raises(RunFolderError, match=r"holds thesis\.tex, which no run writes"):
        run.check_fresh(overwrite=True)
    (tmp_path / "thesis.tex").unlink()
    (tmp_path / "recipe.yaml").write_text("train: {}")
    (tmp_path / ".metrics.json.123.tmp").write_text("")
    run.check_fresh(overwrite=True)
    run.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert (tmp_path / "data" / "manifest.json").is_file()


def test_what_prep_leaves_beside_the_data_is_no_run_and_overwrite_keeps_it(
    tmp_path, real_tokenizer_dir
):
    """`replit-ft prep RECIPE` writes data/ (and, while it runs, its lock and temporaries
    beside it); then `train RECIPE` starts, and `train.overwrite=true` keeps the data, the
    lock and a prep's temporary folder (it may be running)."""
    from data_prep.prepare import PrepConfig, prepare
    from data_prep.settings import build

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x\n" * 20)
    run = RunFolder(tmp_path / "run")
    settings = {"code": [str(tmp_path / "src")], "tokenizer": str(real_tokenizer_dir)}
    prepare(build(PrepConfig, settings | {"out": str(run.data), "seq_len": 64}), progress=False)
    (run.path / ".data.tmp-otherhost-123").mkdir()  # another host's prep, still writing
    (run.path / ".data.lock").touch()  # and its lock
    kept = sorted(p.name for p in run.path.iterdir())
    assert kept == [".data.lock", ".data.tmp-otherhost-123", "data"]
    run.check_fresh(overwrite=False)
    fake_checkpoint(run, 2)
    (run.path / "recipe.yaml").write_text("train: {}")
    run.check_fresh(overwrite=True)
    run.clear()
    assert sorted(p.name for p in run.path.iterdir()) == kept


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer_state.json", "rng_state.pth"])
def test_a_truncated_file_unseals_its_checkpoint_and_the_previous_one_is_used(tmp_path, name):
    run = RunFolder(tmp_path)
    fake_checkpoint(run, 2)
    newest = fake_checkpoint(run, 4)
    assert checkpoint_problem(newest) is None
    file = newest / name
    file.write_bytes(file.read_bytes()[:100])
    said = []
    assert run.newest_complete_checkpoint(said.append) == tmp_path / "checkpoint-2"
    assert said == [f"skipping checkpoint-4: {file} has 100 bytes, 1280 were written"]


def test_a_checkpoint_without_its_seal_or_with_a_changed_file_is_incomplete(tmp_path):
    run = RunFolder(tmp_path)
    unsealed = fake_checkpoint(run, 2, sealed=False)
    assert "complete.json is missing" in checkpoint_problem(unsealed)
    sealed = fake_checkpoint(run, 4)
    (sealed / "rng_state.pth").write_bytes(b"\xff" * (256 * 5))  # same size, other bytes
    assert "changed since it was written" in checkpoint_problem(sealed)
    (sealed / "complete.json").write_text("{not json")
    assert "unreadable" in checkpoint_problem(sealed)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    run = RunFolder(tmp_path)
    for step in (2, 4, 6):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 5, sealed=False)  # an older, never finished one
    fake_checkpoint(run, 8, sealed=False)  # being written right now
    run.rotate(keep=2)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert [p.name for p in run.drop_after(tmp_path / "checkpoint-4")] == [
        "checkpoint-6",
        "checkpoint-8",
    ]


def test_a_bad_record_is_named(tmp_path):
    (tmp_path / "replit_ft.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match=r"replit_ft\.json: expected a JSON object"):
        read_record(tmp_path)
    (tmp_path / "replit_ft.json").write_bytes(b"\xff\xfe")
    with pytest.raises(RunFolderError, match=r"replit_ft\.json: not valid JSON"):
        read_record(tmp_path)
    (tmp_path / "replit_ft.json").write_text(json.dumps({"max_seq_len": 4096}))
    assert read_record(tmp_path) == {"max_seq_len": 4096}
    assert read_record(tmp_path / "nowhere") is None
