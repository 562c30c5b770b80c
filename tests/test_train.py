"""Training from recipes: loss falls, runs are never mixed up or lost, resume is exact."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from finetune.recipe import RecipeError, load_recipe
from finetune.run_folder import RunFolder, RunFolderError
from finetune.train import adapter_digest, main, train
from model import load_model

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(tmp_path: Path, base: Path, **sections) -> Path:
    recipe = {
        "model": {"name": str(base), "quantization": "nf4", "compute_dtype": "fp32"},
        "data": {
            "code": [str(ROOT / "model")],
            "seq_len": 128,
            "validation_fraction": 0.1,
            "out": str(tmp_path / "data"),
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 8,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 3e-3,
            "warmup_steps": 1,
            "eval_every": 4,
            "save_every": 2,
            "keep_last": 10,
            "log_every": 1,
        },
    }
    for section, values in sections.items():
        recipe[section].update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["history"]


def losses(run: Path) -> list[float]:
    return [h["loss"] for h in history(run) if "loss" in h]


def summary(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["summary"]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: equal snapshots, nothing written."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base) -> Path:
    """A finished 8-step run with checkpoints 2, 4, 6, 8 (the pristine copy; tests copy it)."""
    folder = tmp_path_factory.mktemp("finished")
    train(load_recipe(write_recipe(folder, base)), quiet=True)
    return folder


def copy_of(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's folder (recipe, data and run) under `tmp_path`."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    recipe["data"]["out"] = str(tmp_path / "data")
    recipe["train"]["output_dir"] = str(tmp_path / "run")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    saved["data"]["out"] = str(tmp_path / "data")
    saved["train"]["output_dir"] = str(tmp_path / "run")
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(saved))
    return tmp_path / "recipe.yaml"


def test_loss_falls_and_outputs_reload(tmp_path, base):
    recipe = load_recipe(write_recipe(tmp_path, base), ["train.max_steps=16"])
    adapter = train(recipe)
    run = adapter.parent
    curve = losses(run)
    assert len(curve) == 16
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3
    assert {"adapter_config.json", "adapter_model.safetensors", "replit_ft.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert (run / "loss.png").stat().st_size > 1000
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 16
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["Wqkv", "down_proj", "up_proj"]
    record = json.loads((adapter / "replit_ft.json").read_text())
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert record["base"] == str(base) and record["max_seq_len"] == 2048
    assert record["data"]["fingerprint"] == manifest["fingerprint"]
    assert record["summary"]["steps"] == 16
    facts = summary(run)
    assert facts["final_train_loss"] == curve[-1]
    assert facts["tokens"] == 16 * 2 * 2 * 128 and facts["processes"] == 1
    assert 0 < facts["epochs"] and facts["final_eval_loss"] is not None
    model = PeftModel.from_pretrained(load_model(base), str(adapter))
    ids = torch.randint(3, 32768, (1, 16))
    with torch.no_grad():
        plain = load_model(base)(ids).logits
        assert (model(input_ids=ids).logits - plain).abs().max() > 1e-4


def test_a_moved_adapter_keeps_its_trained_context(tmp_path, base):
    """The context an adapter was trained at travels with it (replit_ft.json), not beside it."""
    from finetune.adapter import check_adapter

    recipe = write_recipe(tmp_path, base, data={"seq_len": 4096, "validation_fraction": 0})
    overrides = ["train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum=1"]
    adapter = train(load_recipe(recipe, overrides), quiet=True)
    moved = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(adapter, moved)
    shutil.rmtree(adapter.parent)
    assert check_adapter(moved).max_seq_len == 4096


def test_step_does_not_depend_on_micro_batching(tmp_path, base):
    """Rows with very different numbers of trained tokens: only token-level normalisation agrees."""
    records = [
        {"prompt": "x = 1\n" * (2 + 7 * i), "completion": "y" * (5 + 40 * (i % 2))}
        for i in range(4)
    ]
    (tmp_path / "instr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def step_stats(micro: int, accum: int) -> tuple[float, float]:
        out = tmp_path / f"mb{micro}x{accum}"
        train_cfg = {"micro_batch_size": micro, "grad_accum": accum, "max_steps": 1}
        train_cfg |= {"output_dir": str(out), "eval_every": 100, "save_every": 100}
        data = {"instructions": [str(tmp_path / "instr.jsonl")], "code": [], "packed": False}
        data |= {"validation_fraction": 0.0, "out": str(tmp_path / "idata")}
        recipe = write_recipe(tmp_path, base, train=train_cfg, data=data, lora={"dropout": 0})
        train(load_recipe(recipe), quiet=True)
        first = history(out)[0]
        return first["loss"], first["grad_norm"]

    one = step_stats(micro=4, accum=1)
    for micro, accum in [(1, 4), (2, 2)]:
        assert step_stats(micro, accum) == pytest.approx(one, rel=1e-4), (micro, accum)


def test_sigkill_of_an_overwriting_run_then_resume_matches_an_uninterrupted_run(tmp_path, base):
    """The run folder first holds another, finished run; `overwrite` replaces it for good."""
    straight = tmp_path / "straight"
    straight.mkdir()
    train(load_recipe(write_recipe(straight, base)), quiet=True)

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    recipe = write_recipe(crashed, base)
    train(load_recipe(recipe, ["train.seed=7", "train.max_steps=10"]), quiet=True)
    assert (crashed / "run" / "checkpoint-10").is_dir()

    command = [sys.executable, "-m", "finetune.train", str(recipe), "train.overwrite=true"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = RunFolder(crashed / "run")
    deadline = time.time() + 300

    def newest() -> str | None:
        found = run.newest_complete_checkpoint(lambda message: None)
        return found.name if found else None

    def new_run_started() -> bool:  # the new run's recipe replaced the old run's (seed 7)
        saved = crashed / "run" / "recipe.yaml"
        return saved.is_file() and yaml.safe_load(saved.read_text())["train"]["seed"] == 0

    while not new_run_started() or newest() not in ("checkpoint-4", "checkpoint-6"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "run" / "adapter").exists()
    assert not (crashed / "run" / "checkpoint-10").exists()

    train(load_recipe(recipe, ["train.resume=true"]), quiet=True)
    assert summary(crashed / "run")["resumed_from"].endswith(("checkpoint-4", "checkpoint-6"))
    a, b = adapter_tensors(straight / "run"), adapter_tensors(crashed / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(crashed / "run") == losses(straight / "run")


def test_resuming_a_finished_run_trains_no_step_more(tmp_path, finished, capsys):
    """transformers' loop, resumed at max_steps, runs one step more (9 of 8, then 10...)."""
    recipe = copy_of(finished, tmp_path)
    before = snapshot(tmp_path)
    adapter = train(load_recipe(recipe, ["train.resume=true"]), quiet=True)
    assert adapter == tmp_path / "run" / "adapter"
    assert "already ran its train.max_steps=8 steps: nothing to do" in capsys.readouterr().out
    assert snapshot(tmp_path) == before
    with pytest.raises(RecipeError, match=r"checkpoint-8 is past train.max_steps=6, .* or more"):
        train(load_recipe(recipe, ["train.resume=true", "train.max_steps=6"]))
    assert snapshot(tmp_path) == before


def test_a_run_killed_after_its_last_checkpoint_ends_with_the_adapter_it_trained(
    tmp_path, finished
):
    """Killed while writing its adapter (or in its HumanEval): resuming trains no step more."""
    recipe = copy_of(finished, tmp_path)
    run = tmp_path / "run"
    for name in ("adapter", "metrics.json", "loss.png"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    train(load_recipe(recipe, ["train.resume=true"]), quiet=True)
    assert summary(run)["steps"] == 8 and summary(run)["resumed_from"].endswith("checkpoint-8")
    assert not (run / "checkpoint-9").exists()
    a, b = adapter_tensors(finished / "run"), adapter_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert losses(run) == losses(finished / "run")


def test_a_fresh_run_into_an_earlier_run_is_refused_and_writes_nothing(tmp_path, finished):
    recipe = copy_of(finished, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError) as caught:
        train(load_recipe(recipe))
    message = str(caught.value)
    assert str(tmp_path / "run") in message
    assert "train.resume=true" in message and "train.overwrite=true" in message
    assert snapshot(tmp_path) == before


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, base):
    recipe = write_recipe(tmp_path, base, train={"output_dir": str(tmp_path / "taken")})
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(RunFolderError, match=r"taken exists and is not a folder"):
        train(load_recipe(recipe), quiet=True)
    assert (tmp_path / "taken").read_text() == "mine" and not (tmp_path / "data").exists()


def test_a_second_launch_into_a_folder_in_training_is_refused(tmp_path, finished):
    """What a command run twice, or a resume while the run still trains, would meet."""
    recipe = load_recipe(copy_of(finished, tmp_path), ["train.resume=true"])
    with RunFolder(tmp_path / "run").exclusive():  # the launch training there
        before = snapshot(tmp_path)
        with pytest.raises(RunFolderError, match="another launch is training here"):
            train(recipe, quiet=True)
        assert snapshot(tmp_path) == before
    train(recipe, quiet=True)  # once it has ended: the finished run, nothing to do


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lr=1e-3", "train.lr: 0.003 when the run started, 0.001 now"),
        ("lora.r=4", "lora.r: 8 when the run started, 4 now"),
        ("data.seq_len=64", "data.seq_len: 128 when the run started, 64 now"),
        ("train.seed=3", "train.seed: 0 when the run started, 3 now"),
    ],
)
def test_resume_refuses_to_change_what_a_run_is(tmp_path, finished, override, named):
    recipe = copy_of(finished, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RecipeError) as caught:
        train(load_recipe(recipe, ["train.resume=true", override]))
    assert named in str(caught.value)
    assert "train.max_steps" in str(caught.value)  # what may change
    assert snapshot(tmp_path) == before


def test_resume_refuses_changed_data(tmp_path, finished):
    """The same keys, other file contents: the data's fingerprint tells."""
    recipe_path = copy_of(finished, tmp_path)
    code = tmp_path / "code"
    shutil.copytree(ROOT / "model", code)
    recipe = yaml.safe_load(recipe_path.read_text())
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    # Point both recipes at a copy of the same code: the run's data fingerprint still holds...
    for values in (recipe, saved):
        values["data"]["code"] = [str(code)]
    recipe_path.write_text(yaml.safe_dump(recipe))
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(saved))
    # ...until a file changes.
    (code / "attention.py").write_text((code / "attention.py").read_text() + "\n# changed\n")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match=r"the data changed since the run started"):
        train(load_recipe(recipe_path, ["train.resume=true"]))
    assert snapshot(tmp_path / "run") == before


def test_resume_with_more_steps_follows_the_schedule_of_the_new_max_steps(
    tmp_path, finished, capsys
):
    recipe = copy_of(finished, tmp_path)
    train(load_recipe(recipe, ["train.resume=true", "train.max_steps=12"]))
    assert "resume: train.max_steps 8 -> 12" in capsys.readouterr().out
    run = tmp_path / "run"
    assert summary(run)["steps"] == 12
    logged = {h["step"]: h["learning_rate"] for h in history(run) if "learning_rate" in h}
    # The independent reference: transformers' own schedule of a 12-step run.
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=3e-3)
    planned = get_cosine_schedule_with_warmup(optimizer, 1, 12)
    expected = {}
    for step in range(1, 13):
        expected[step] = optimizer.param_groups[0]["lr"]  # the rate step `step` trains with
        optimizer.step()
        planned.step()
    for step in range(9, 13):
        assert logged[step] == pytest.approx(expected[step], rel=1e-9), step
    assert logged[9] > 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 12


@pytest.mark.parametrize("broken", ["optimizer.pt", "trainer_state.json", "rng_state.pth"])
def test_a_corrupt_newest_checkpoint_is_skipped_and_the_previous_one_used(
    tmp_path, finished, broken, capsys
):
    recipe = copy_of(finished, tmp_path)
    run = tmp_path / "run"
    file = run / "checkpoint-8" / broken
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    shutil.rmtree(run / "adapter")
    train(load_recipe(recipe, ["train.resume=true"]))
    out = capsys.readouterr().out
    assert f"skipping checkpoint-8: {file} has" in out
    assert summary(run)["resumed_from"] == str(run / "checkpoint-6")
    # Steps 7 and 8 again, from checkpoint-6's exact state: the same adapter as the first time.
    again, first = adapter_tensors(run), adapter_tensors(finished / "run")
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_a_full_disk_while_checkpointing_is_named_and_resume_works(tmp_path, finished, monkeypatch):
    recipe = copy_of(finished, tmp_path)
    run = tmp_path / "run"
    for entry in list(run.iterdir()):
        if entry.name != "data":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-6" in str(f):
            # What torch's zip writer raises when the disk fills.
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 2304 vs 2198: "
                "file write failed"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on the device while writing .*checkpoint-6"):
        train(load_recipe(recipe))
    monkeypatch.setattr(torch, "save", real_save)
    train(load_recipe(recipe, ["train.resume=true"]), quiet=True)
    assert summary(run)["resumed_from"] == str(run / "checkpoint-4")
    again, first = adapter_tensors(run), adapter_tensors(finished / "run")
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_sharded_accelerate_config_is_refused_on_cpu_before_any_work(tmp_path, base, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(
        RecipeError, match=r"accelerate config .* uses FSDP, which the kit runs on GPUs"
    ):
        train(load_recipe(write_recipe(tmp_path, base)))
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_quiet_run_prints_no_progress_bar_and_ends_with_a_readable_summary(tmp_path, base, capfd):
    recipe = write_recipe(tmp_path, base, train={"max_steps": 2, "save_every": 100})
    main(["--quiet", str(recipe)])
    out, err = capfd.readouterr()
    assert "%|" not in out + err and "it/s" not in out + err
    run = tmp_path / "run"
    for line in (
        "done: 2 steps,",
        f"adapter     {run / 'adapter'}",
        f"loss plot   {run / 'loss.png'}",
        f"metrics     {run / 'metrics.json'}",
        f"tensorboard --logdir {run / 'tensorboard'}",
    ):
        assert line in out, line
    assert f"train {summary(run)['final_train_loss']:.4f}" in out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_prepare_once_print_once_and_count_every_token(tmp_path, base):
    """torchrun with gloo (REFERENCE: `accelerate launch --cpu` would start one process)."""
    overrides = {"max_steps": 5, "save_every": 100, "log_every": 2, "micro_batch_size": 2}
    recipe = write_recipe(tmp_path, base, train=overrides | {"grad_accum": 2})
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", "finetune.train", "--quiet", str(recipe)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    root_cause = "\n".join(line for line in done.stderr.splitlines() if "[rank0]" in line)
    assert done.returncode == 0, root_cause[-3000:] + "\n...\n" + done.stderr[-2000:]
    assert done.stdout.count("dataset  ") == 1 and done.stdout.count("done: 5 steps") == 1
    assert done.stdout.count("trainable parameters") == 1
    run = tmp_path / "run"
    facts = summary(run)
    assert facts["processes"] == 2 and facts["tokens"] == 5 * 2 * 2 * 2 * 128
    assert facts["tokens_per_second"] == pytest.approx(facts["tokens"] / facts["seconds"], rel=0.02)
    digests = facts["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert adapter_digest(adapter_tensors(run)) == digests[0]

    # One process with twice the accumulation sees the same rows in each step: the same losses.
    single = tmp_path / "single"
    one = write_recipe(
        tmp_path, base, train=overrides | {"grad_accum": 4, "output_dir": str(single)}
    )
    train(load_recipe(one), quiet=True)
    assert [h["step"] for h in history(run) if "loss" in h] == [2, 4, 5]
    assert losses(run) == pytest.approx(losses(single), rel=1e-3)  # reduction order differs
    assert facts["final_train_loss"] == pytest.approx(summary(single)["final_train_loss"], rel=1e-3)
    assert math.isfinite(facts["final_eval_loss"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.data.seq_len >= 256 and recipe.lora.targets
    assert Path(recipe.train.output_dir).is_relative_to(ROOT / "runs")


def test_accelerate_configs_wrap_the_kits_blocks():
    from model.modeling import ReplitForCausalLM

    configs = {
        p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "recipes/accelerate").glob("*.yaml")
    }
    assert set(configs) == {
        "single_gpu.yaml",
        "ddp.yaml",
        "fsdp_qlora.yaml",
        "deepspeed_zero3.yaml",
    }
    fsdp = configs["fsdp_qlora.yaml"]["fsdp_config"]
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in ReplitForCausalLM._no_split_modules
    assert configs["deepspeed_zero3.yaml"]["deepspeed_config"]["zero_stage"] == 3


def test_model_set_up_warns_nothing(tmp_path, base):
    """peft calls transformers' deprecated checkpointing names; the user must not see that."""
    import warnings

    from finetune.lora import build_model
    from finetune.recipe import LoraSection, ModelSection

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(
            ModelSection(name=str(base), quantization="nf4", compute_dtype="fp32"),
            LoraSection(r=4, alpha=8, dropout=0.0),
            seq_len=4096,
            device=torch.device("cpu"),
            gradient_checkpointing=True,
        )
        assert model.get_base_model().config.max_seq_len == 4096
