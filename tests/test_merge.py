"""Merging adapters: exact logits through both loaders, the files, safe writes, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune.adapter import AdapterError, check_adapter
from finetune.cli import main
from finetune.merge import merge
from model import ReplitForCausalLM, load_model, load_tokenizer
from model.checkpoint import CheckpointError
from model.random_checkpoint import write_checkpoint

TARGETS = ["Wqkv", "out_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, **lora) -> Path:
    """A random LoRA adapter (B not zero, so it changes the model) saved by peft."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    for key, value in lora.items():
        setattr(config, key, value)
    get_peft_model(load_model(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base) -> Path:
    """An adapter folder as `replit-ft train` leaves it: peft's files and replit_ft.json."""
    adapter = make_adapter(base, tmp_path_factory.mktemp("run") / "adapter")
    recipe = {
        "model": {"name": str(base)},
        "data": {"seq_len": 4096, "code": ["src/"]},
        "train": {"lr": 2e-4, "micro_batch_size": 1, "grad_accum": 8},
    }
    summary = {"final_train_loss": 1.2345, "steps": 16, "tokens_per_second": 812.5}
    record = {"base": str(base), "max_seq_len": 4096, "recipe": recipe, "summary": summary}
    (adapter / "replit_ft.json").write_text(json.dumps(record))
    return adapter


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter) -> Path:
    """Merged through the command line, in fp32, with shards small enough to split it."""
    out = tmp_path_factory.mktemp("merged") / "model"
    command = ["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]
    main([*command, "--max-shard-size", "1MB"])
    return out


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 32768, (batch, length))


def test_merged_logits_equal_adapter_logits_through_both_loaders(base, adapter, merged):
    ids = tokens(2, 24)
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(base), str(adapter))(input_ids=ids).logits
        plain = load_model(base)(ids).logits
        ours = load_model(merged)(ids).logits
        stock = AutoModelForCausalLM.from_pretrained(merged)
        theirs = stock(ids).logits
    assert type(stock).__name__ == "MptForCausalLM"
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the model
    assert (ours - want).abs().max() <= 1e-4
    assert (theirs - want).abs().max() <= 1e-4


def test_checkpoint_files(base, merged):
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "mpt"
    assert config["architectures"] == ["MptForCausalLM"] and "auto_map" not in config
    assert config["max_seq_len"] == 4096  # the adapter's trained context, above the base's 2048
    record = json.loads((merged / "replit_ft.json").read_text())
    assert record["max_seq_len"] == 4096 and record["merged"]["dtype"] == "fp32"
    assert record["summary"]["steps"] == 16
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((merged / s).is_file() for s in shards)
    assert not list(merged.glob("*.bin"))
    generation = json.loads((merged / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 2)
    text = "def f(x):\n\t\treturn  x <|endoftext|>" + " " * 40 + "é\n\n"
    theirs, ours = load_tokenizer(base), load_tokenizer(merged)
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.decode(ours(text).input_ids) == text


def test_model_card_has_training_summary_and_attribution(merged):
    card = (merged / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-sa-4.0\n")
    assert "Replit, Inc." in card
    assert "https://creativecommons.org/licenses/by-sa/4.0/" in card
    assert "LoRA adapter was fine-tuned" in card and "merged into the weights" in card
    assert "same license" in card
    for fact in (
        "| final train loss | 1.234 |",
        "| steps | 16 |",
        "| max_seq_len | 4096 |",
        "`src/`",
    ):
        assert fact in card
    assert "base_model:" not in card  # a local base is no hub id


@pytest.mark.parametrize("loader", ["load_model", "AutoModelForCausalLM"])
def test_merged_folder_round_trips(merged, tmp_path, loader):
    first = load_model(merged)
    model = first if loader == "load_model" else AutoModelForCausalLM.from_pretrained(merged)
    model.save_pretrained(tmp_path / "again")
    second = load_model(tmp_path / "again")
    want, got = first.state_dict(), second.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_bf16_merge_rounds_the_fp32_sum_once(base, adapter, tmp_path):
    out = merge(adapter, tmp_path / "bf16", progress=False)
    reference = PeftModel.from_pretrained(load_model(base), str(adapter))
    layer = reference.base_model.model.transformer.blocks[1].ffn.up_proj
    exact = layer.base_layer.weight + layer.get_delta_weight("default")
    saved = load_file(out / "model.safetensors")["transformer.blocks.1.ffn.up_proj.weight"]
    assert saved.dtype == torch.bfloat16
    assert torch.equal(saved, exact.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_refuses_to_overwrite_unless_told(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; refusing to overwrite"):
        merge(adapter, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="replit-ft merge: .*--overwrite"):
        main(["merge", "--adapter", str(adapter), "--out", str(out)])
    merge(adapter, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(ValueError, match="which this merge reads"):
        merge(adapter, adapter.parent, overwrite=True, progress=False)


def test_failed_merge_leaves_nothing_behind(adapter, tmp_path, monkeypatch):
    real_save = ReplitForCausalLM.save_pretrained

    def save_then_fail(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        assert any(Path(directory).glob("*.safetensors"))
        raise OSError("disk full")

    monkeypatch.setattr(ReplitForCausalLM, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        merge(adapter, tmp_path / "new", progress=False)
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        merge(adapter, old, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


def broken_copy(adapter: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    return copy


def edit_config(adapter: Path, **values) -> None:
    file = adapter / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | values))


def test_adapter_of_another_base_names_tensor_and_shapes(base, adapter, tmp_path):
    other = write_checkpoint(tmp_path / "other", n_layers=2, d_model=128, n_heads=4, vocab=512)
    foreign = make_adapter(other, tmp_path / "foreign")
    pattern = (
        r"adapter_model\.safetensors: tensor 'base_model\.model\.transformer\.blocks\.0\.attn"
        r"\.Wqkv\.lora_A\.weight' has shape \[8, 128\], .* expected \[8, 64\]"
    )
    with pytest.raises(AdapterError, match=pattern) as caught:
        merge(foreign, tmp_path / "out", base=base, progress=False)
    assert f"trained on {other}" in str(caught.value)
    command = ["merge", "--adapter", str(foreign), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^replit-ft merge: .*has shape \[8, 128\]"):
        main([*command, "--base", str(base)])
    assert not (tmp_path / "out").exists()


def test_other_target_modules_are_named(adapter, tmp_path):
    bad = broken_copy(adapter, tmp_path)
    edit_config(bad, target_modules=["Wqkv", "mlp_up"])
    with pytest.raises(AdapterError, match=r"adapter_config\.json: target module 'mlp_up' match"):
        check_adapter(bad)
    edit_config(bad, target_modules=["Wqkv"])
    with pytest.raises(AdapterError, match=r"out_proj\.lora_A\.weight' is for layer .*leaves out"):
        check_adapter(bad)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_adapter_file_is_named(adapter, tmp_path, missing):
    bad = broken_copy(adapter, tmp_path)
    (bad / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing}: missing"):
        merge(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_adapter_file_or_a_run_folder_given_as_adapter_points_to_the_adapter(adapter, tmp_path):
    """Two slips a user makes: a file of the adapter, and the run folder that holds it."""
    file = adapter / "adapter_model.safetensors"
    with pytest.raises(NotADirectoryError) as caught:
        check_adapter(file)
    assert str(caught.value) == (
        f"{file}: a file; an adapter is the folder that holds adapter_config.json: {adapter}"
    )
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    command = ["merge", "--adapter", str(run), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as caught:
        main(command)
    assert str(caught.value).endswith(f"{run} is a run folder: its adapter is {run / 'adapter'}")
    assert not (tmp_path / "out").exists()


def test_adapter_named_for_another_copy_of_the_base_warns(base, adapter, tmp_path):
    copy = shutil.copytree(base, tmp_path / "copy")
    with pytest.warns(UserWarning, match=f"trained on {base}; applying it to {copy}"):
        assert check_adapter(adapter, copy).base_path == copy


def scaled_adapter(adapter: Path, tmp_path: Path, layer: str, value: float) -> Path:
    """A copy of `adapter` whose lora_A and lora_B of `layer` hold `value` everywhere."""
    copy = broken_copy(adapter, tmp_path)
    weights = load_file(copy / "adapter_model.safetensors")
    for key in weights:
        if f".{layer}.lora_" in key:
            weights[key] = torch.full_like(weights[key], value)
    save_file(weights, copy / "adapter_model.safetensors")
    return copy


def test_fp16_overflow_is_refused_and_bf16_suggested(adapter, tmp_path):
    """Each merged up_proj value is 8 x 100 x 100 x (16 / 8) = 160000: finite in fp32 and bf16,
    inf in fp16 (max 65504)."""
    big = scaled_adapter(adapter, tmp_path / "adapters", "blocks.1.ffn.up_proj", 100.0)
    out = tmp_path / "out" / "model"
    with pytest.raises(
        ValueError,
        match=r"tensor 'transformer.blocks.1.ffn.up_proj.weight' has values beyond fp16's range "
        r".* written as inf; merge with --dtype bf16",
    ):
        merge(big, out, dtype="fp16", progress=False)
    assert list(out.parent.iterdir()) == []
    with pytest.raises(SystemExit, match=r"^replit-ft merge: .*up_proj.weight.*--dtype bf16"):
        main(["merge", "--adapter", str(big), "--out", str(out), "--dtype", "fp16"])
    merge(big, out, dtype="bf16", progress=False)
    saved = load_file(out / "model.safetensors")["transformer.blocks.1.ffn.up_proj.weight"]
    assert torch.isfinite(saved).all() and saved.float().abs().min() > 65504


def test_non_finite_adapter_or_base_is_named(base, adapter, tmp_path):
    nan = scaled_adapter(adapter, tmp_path / "nan", "blocks.0.attn.Wqkv", float("nan"))
    with pytest.raises(
        AdapterError,
        match=r"adapter_model.safetensors: merged into transformer.blocks.0.attn.Wqkv.weight it "
        r"gives inf or NaN even in fp32",
    ):
        merge(nan, tmp_path / "out", progress=False)
    broken = shutil.copytree(base, tmp_path / "base")
    state = torch.load(broken / "pytorch_model.bin", weights_only=True)
    state["transformer.norm_f.weight"][3] = float("inf")
    torch.save(state, broken / "pytorch_model.bin")
    with (
        pytest.raises(CheckpointError, match=r"tensor 'transformer.norm_f.weight' of the base"),
        pytest.warns(UserWarning, match=f"trained on {base}; applying it to {broken}"),
    ):
        merge(adapter, tmp_path / "out", base=broken, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "nan"]


def test_stale_partial_folders_of_dead_merges_are_removed(adapter, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    host = socket.gethostname()
    folders = {
        "dead": f".model.partial-{host}-{dead.pid}",
        "older name": f".model.partial-{dead.pid}",
        "alive": f".model.partial-{host}-{alive.pid}",
        "other host": f".model.partial-elsewhere-{dead.pid}",
        "other output": f".model2.partial-{host}-{dead.pid}",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    try:
        merge(adapter, tmp_path / "model", progress=False)
    finally:
        alive.kill()
        alive.wait()
    kept = {folders[k] for k in ("alive", "other host", "other output")}
    assert {p.name for p in tmp_path.iterdir()} == {"model"} | kept


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_written_file_has_the_mode_open_gives(adapter, tmp_path, umask, mode):
    """safetensors writes 0600; the checkpoint's files follow the umask like any other file."""
    old = os.umask(umask)
    try:
        out = merge(adapter, tmp_path / "model", max_shard_size="1MB", progress=False)
    finally:
        os.umask(old)
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model-00001-of-00002.safetensors" in files and "spiece.model" in files
    assert files == dict.fromkeys(files, mode)


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -m` and mount (root)")
def test_full_disk_says_so_and_leaves_nothing(base, adapter, tmp_path):
    """A real ENOSPC: the merge writes into a 1 MB tmpfs in a private mount namespace."""
    state = torch.load(base / "pytorch_model.bin", weights_only=True)
    needed = sum(t.numel() for t in state.values()) * 2  # bf16
    disk = tmp_path / "disk"
    disk.mkdir()
    merge_cmd = f"{sys.executable} -m finetune.cli merge --adapter {adapter} --out {disk}/model"
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {disk} && {merge_cmd}; code=$?; ls -A {disk}; exit $code"
    )
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().endswith(
        f"replit-ft merge: [Errno 28] {disk}: no space left on the disk; the merged checkpoint "
        f"needs about {needed / 1e6:.0f} MB there (nothing was written)"
    )
    assert run.stdout == ""  # ls -A of the full disk: no temporary folder left


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("max_shard_size", "5XB", r"max_shard_size '5XB': expected a size like 5GB"),
        ("max_shard_size", 0, r"max_shard_size 0: expected a size like 5GB"),
        ("dtype", torch.float64, r"dtype torch.float64: a merge writes bf16, fp16 or fp32"),
        ("dtype", "int8", r"unknown dtype 'int8'"),
    ],
)
def test_bad_merge_options_before_any_work(adapter, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        merge(adapter, tmp_path / "out", progress=False, **{option: value})
    assert list(tmp_path.iterdir()) == []


def edit_file(file: Path, content: bytes) -> None:
    file.write_bytes(content)


def truncate(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda a: truncate(a / "adapter_model.safetensors", 50),
            r"adapter_model.safetensors: unr",
        ),
        (lambda a: edit_file(a / "adapter_config.json", b"[1]"), r"config.json: expected a JSON"),
        (lambda a: edit_file(a / "adapter_config.json", b"[" * 100_000), r"config.json: not valid"),
        (lambda a: edit_config(a, r=16), r"r is 16 for layer .*, but its tensors have rank 8"),
        (lambda a: edit_config(a, r="8"), r"adapter_config.json: r is '8', expected a positive"),
        (lambda a: edit_config(a, lora_alpha=None), r"lora_alpha is None, expected a positive"),
        (lambda a: edit_config(a, rank_pattern={"Wqkv": 4}), r"r is 4 for layer .*Wqkv, but"),
        (lambda a: edit_config(a, rank_pattern={"(": 4}), r"rank_pattern has a bad pattern"),
        (lambda a: edit_config(a, lora_bias=True), r"lora_bias is true, but the base's linear"),
        (lambda a: edit_config(a, use_dora=True), r"use_dora is true, but layer .* lacks a DoRA"),
    ],
)
def test_hostile_adapters_are_named(adapter, tmp_path, break_it, message):
    bad = broken_copy(adapter, tmp_path)
    break_it(bad)
    with pytest.raises(ValueError, match=message):
        check_adapter(bad)
    with pytest.raises(SystemExit, match=rf"^replit-ft merge: {bad}/.*{message}"):
        main(["merge", "--adapter", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_integer_adapter_weights_are_refused(adapter, tmp_path):
    bad = broken_copy(adapter, tmp_path)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    save_file(weights | {key: weights[key].to(torch.int32)}, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(key)}' is I32; weights must be"):
        check_adapter(bad)


@pytest.mark.parametrize(
    "settings", [{"use_dora": True}, {"rank_pattern": {"up_proj": 4}, "alpha_pattern": {"Wqkv": 4}}]
)
def test_dora_and_pattern_adapters_as_peft_saves_them_pass(base, tmp_path, settings):
    made = make_adapter(base, tmp_path / "adapter", **settings)
    info = check_adapter(made)
    assert {k: info.config[k] for k in settings} == settings


def test_a_second_merge_into_the_same_folder_is_refused(adapter, tmp_path):
    from data_prep.files import locked

    out = tmp_path / "model"
    with locked(out, on_busy=lambda lock: None):  # a merge writing it
        with pytest.raises(FileExistsError, match="another merge is writing it"):
            merge(adapter, out, progress=False)
    assert not out.exists()
    merge(adapter, out, progress=False)
    assert (out / "config.json").is_file()
