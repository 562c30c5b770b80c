"""`eval context`: loss by position bucket, against the model's own loss; base beside adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from data_prep.prepare import PrepConfig, prepare
from finetune.cli import main
from finetune.context_eval import evaluate_context, windows_from_code
from model import load_model, load_tokenizer

CODE = str(Path(__file__).resolve().parents[1] / "model")  # held-out code: the kit's own
SEQ_LEN, BUCKET = 256, 64


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["Wqkv", "up_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("run") / "adapter"
    get_peft_model(load_model(tiny_checkpoint), config).save_pretrained(out)
    return out


def test_buckets_are_contiguous_and_agree_with_the_models_own_loss(tiny_checkpoint, tmp_path):
    results = evaluate_context(
        tmp_path, model=tiny_checkpoint, code=[CODE], seq_len=SEQ_LEN, bucket=BUCKET
    )
    buckets = results["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 64), (64, 128), (128, 192), (192, 256)]
    windows = results["source"]["windows"]
    assert windows >= 3
    assert [b["tokens"] for b in buckets] == [63 * windows] + [64 * windows] * 3
    # The token-weighted mean of the buckets is the mean of the model's own loss per window.
    model, tokenizer = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    ids = torch.as_tensor(windows_from_code([CODE], tokenizer, SEQ_LEN, progress=False).input_ids)
    with torch.no_grad():
        own = torch.stack(
            [model(input_ids=row[None].long(), labels=row[None].long()).loss for row in ids]
        )
    mean = sum(b["loss"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
    assert mean == pytest.approx(own.mean().item(), abs=1e-4)
    assert json.loads((tmp_path / "context.json").read_text()) == results
    assert (tmp_path / "context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_with_an_adapter_the_base_is_measured_beside_it(tiny_checkpoint, adapter, tmp_path):
    plain = evaluate_context(
        tmp_path / "base", model=tiny_checkpoint, code=[CODE], seq_len=SEQ_LEN, bucket=BUCKET
    )
    both = evaluate_context(
        tmp_path / "both", model=None, adapter=adapter, code=[CODE], seq_len=SEQ_LEN, bucket=BUCKET
    )
    for alone, pair in zip(plain["buckets"], both["buckets"], strict=True):
        assert pair["base_loss"] == pytest.approx(alone["loss"], abs=1e-4)
        assert abs(pair["loss"] - pair["base_loss"]) > 1e-3  # the adapter changes the model
    assert both["trained_context"] == {"base": 2048, "adapter": 2048}
    assert (tmp_path / "both" / "context.png").is_file()


def test_a_prepared_datasets_validation_rows(tiny_checkpoint, tmp_path):
    config = PrepConfig(
        code=[CODE], tokenizer=str(tiny_checkpoint), seq_len=SEQ_LEN, out=str(tmp_path / "data")
    )
    config.validation_fraction = 0.3
    prepare(config, progress=False)
    results = evaluate_context(
        tmp_path / "out", model=tiny_checkpoint, data=tmp_path / "data", seq_len=128, bucket=BUCKET
    )
    assert [(b["start"], b["end"]) for b in results["buckets"]] == [(0, 64), (64, 128)]
    assert all(b["tokens"] > 0 and b["loss"] > 0 for b in results["buckets"])
    with pytest.raises(ValueError, match="rows of 256 tokens, fewer than --seq-len 512"):
        evaluate_context(tmp_path, model=tiny_checkpoint, data=tmp_path / "data", seq_len=512)


def test_command_line(tiny_checkpoint, tmp_path, capsys):
    command = ["eval", "context", "--model", str(tiny_checkpoint), "--out", str(tmp_path)]
    main([*command, "--code", CODE, "--seq-len", "128", "--bucket", "64"])
    table = capsys.readouterr().out
    assert "     0-63" in table and "    64-127" in table and "context.json" in table
    with pytest.raises(SystemExit, match="replit-ft eval: no file under .* has 100000 tokens"):
        main([*command, "--code", CODE, "--seq-len", "100000"])
    with pytest.raises(SystemExit, match=r"^replit-ft eval: --code: \S*nowhere: no such file or"):
        main([*command, "--code", str(tmp_path / "nowhere"), "--seq-len", "128"])
