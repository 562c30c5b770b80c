"""Merging adapters: exact logits through both loaders, the files, safe writes, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.adapter import AdapterError, check_adapter
from finetune.cli import main
from finetune.merge import merge
from model import ReplitForCausalLM, load_model, load_tokenizer
from model.testing import write_checkpoint

TARGETS = ["Wqkv", "out_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, **lora) -> Path:
    """A random LoRA adapter (B not zero, so it changes the model) saved by peft."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    for key, value in lora.items():
        setattr(config, key, value)
    get_peft_model(load_model(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, real_tokenizer_dir) -> Path:
    path = tmp_path_factory.mktemp("base")
    return write_checkpoint(
        path, n_layers=2, d_model=64, n_heads=4, tokenizer=real_tokenizer_dir, std=0.1
    )


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base) -> Path:
    """A run folder as `replit-ft train` leaves it: adapter/, recipe.yaml, metrics.json."""
    run = tmp_path_factory.mktemp("run")
    recipe = {
        "model": {"name": str(base)},
        "data": {"seq_len": 4096, "code": ["src/"]},
        "train": {"lr": 2e-4, "micro_batch_size": 1, "grad_accum": 8},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = {"train_loss": 1.2345, "steps": 16, "seq_len": 4096, "tokens_per_second": 812.5}
    (run / "metrics.json").write_text(json.dumps({"summary": summary, "history": []}))
    return make_adapter(base, run / "adapter")


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
    assert config["max_seq_len"] == 4096  # the recipe's data.seq_len, above the base's 2048
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
    for fact in ("| train loss | 1.234 |", "| steps | 16 |", "| max_seq_len | 4096 |", "`src/`"):
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


def test_adapter_named_for_another_copy_of_the_base_warns(base, adapter, tmp_path):
    copy = shutil.copytree(base, tmp_path / "copy")
    with pytest.warns(UserWarning, match=f"trained on {base}; applying it to {copy}"):
        assert check_adapter(adapter, copy).base_path == copy
