"""Training from recipes: loss falls, crash-resume is exact, micro-batching changes nothing."""

from __future__ import annotations

import importlib.util
import json
import os
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

from finetune.recipe import load_recipe
from finetune.train import adapter_digest, newest_checkpoint, train
from model import load_model
from model.testing import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory, real_tokenizer_dir) -> Path:
    path = tmp_path_factory.mktemp("base")
    return write_checkpoint(
        path, n_layers=2, d_model=64, n_heads=4, tokenizer=real_tokenizer_dir, std=0.1
    )


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


def losses(run: Path) -> list[float]:
    history = json.loads((run / "metrics.json").read_text())["history"]
    return [h["loss"] for h in history if "loss" in h]


def test_loss_falls_and_outputs_reload(tmp_path, base):
    recipe = load_recipe(write_recipe(tmp_path, base), ["train.max_steps=16"])
    adapter = train(recipe)
    run = adapter.parent
    curve = losses(run)
    assert len(curve) == 16
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter.iterdir()
    }
    assert (run / "loss.png").stat().st_size > 1000
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 16
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["Wqkv", "down_proj", "up_proj"]
    model = PeftModel.from_pretrained(load_model(base), str(adapter))
    ids = torch.randint(3, 32768, (1, 16))
    with torch.no_grad():
        plain = load_model(base)(ids).logits
        assert (model(input_ids=ids).logits - plain).abs().max() > 1e-4


def test_unknown_recipe_key_is_named(tmp_path, base):
    path = write_recipe(tmp_path, base)
    with pytest.raises(ValueError, match=r"unknown recipe key lora\.rnak"):
        load_recipe(path, ["lora.rnak=8"])
    with pytest.raises(ValueError, match=r"unknown recipe key trian"):
        load_recipe(path, ["trian.max_steps=8"])
    with pytest.raises(ValueError, match=r"train\.max_steps: expected int"):
        load_recipe(path, ["train.max_steps=many"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match=r"train.wandb=true needs wandb"):
            train(load_recipe(path, ["train.wandb=true"]))
    with pytest.raises(ValueError, match=r"mlp_up.*match no layer"):
        train(load_recipe(path, ["lora.targets=[mlp_up]"]))


def step_stats(tmp_path: Path, base: Path, micro: int, accum: int) -> tuple[float, float]:
    out = tmp_path / f"mb{micro}x{accum}"
    train_cfg = {"micro_batch_size": micro, "grad_accum": accum, "max_steps": 1}
    train_cfg |= {"output_dir": str(out), "eval_every": 100, "save_every": 100}
    data = {"instructions": [str(tmp_path / "instr.jsonl")], "code": [], "packed": False}
    data |= {"validation_fraction": 0.0, "out": str(tmp_path / "idata")}
    train(
        load_recipe(write_recipe(tmp_path, base, train=train_cfg, data=data, lora={"dropout": 0}))
    )
    first = json.loads((out / "metrics.json").read_text())["history"][0]
    return first["loss"], first["grad_norm"]


def test_step_does_not_depend_on_micro_batching(tmp_path, base):
    """Rows with very different numbers of trained tokens: only token-level normalisation agrees."""
    records = [
        {"prompt": "x = 1\n" * (2 + 7 * i), "completion": "y" * (5 + 40 * (i % 2))}
        for i in range(4)
    ]
    (tmp_path / "instr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    one = step_stats(tmp_path, base, micro=4, accum=1)
    for micro, accum in [(1, 4), (2, 2)]:
        other = step_stats(tmp_path, base, micro, accum)
        assert other == pytest.approx(one, rel=1e-4), (micro, accum)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, base):
    straight = tmp_path / "straight"
    straight.mkdir()
    recipe = write_recipe(straight, base)
    train(load_recipe(recipe))

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    recipe = write_recipe(crashed, base)
    command = [sys.executable, "-m", "finetune.train", str(recipe)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (
        newest_checkpoint(crashed / "run") is None
        or newest_checkpoint(crashed / "run").name == "checkpoint-2"
    ):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "run" / "adapter").exists()

    train(load_recipe(recipe, ["train.resume=true"]))
    summary = json.loads((crashed / "run" / "metrics.json").read_text())["summary"]
    assert summary["resumed_from"].endswith(("checkpoint-4", "checkpoint-6"))
    a = load_file(straight / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert losses(crashed / "run") == pytest.approx(losses(straight / "run"), abs=1e-6)


def test_two_processes_end_with_identical_adapters(tmp_path, base):
    """torchrun with gloo (REFERENCE: `accelerate launch --cpu` would start one process)."""
    recipe = write_recipe(tmp_path, base, train={"max_steps": 4, "save_every": 100})
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # A free port, so that a neighbour's torchrun on the default 29500 cannot meet ours.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), "-m", "finetune.train"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(recipe)], env=env, capture_output=True, text=True, timeout=600
    )
    root_cause = "\n".join(line for line in done.stderr.splitlines() if "[rank0]" in line)
    assert done.returncode == 0, root_cause[-3000:] + "\n...\n" + done.stderr[-2000:]
    run = tmp_path / "run"
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    digests = summary["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter_digest(saved) == digests[0]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.1)
    assert sorted(config["target_modules"]) == ["Wqkv", "down_proj", "up_proj"]
    assert summary["steps"] == 4


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.data.seq_len >= 256 and recipe.lora.targets
    assert set(recipe.lora.targets) <= {"Wqkv", "out_proj", "up_proj", "down_proj"}


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
