"""Recipes are checked whole when loaded: every error names the file and line, or the override."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from data_prep.settings import describe
from finetune.cli import main as cli
from finetune.recipe import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  name: replit/replit-code-v1-3b
data:
  code: [src]
  seq_len: 512
lora:
  r: 8
train:
  output_dir: out/run
  lr: 1e-3
  max_steps: 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_scientific_floats_are_floats_and_paths_are_relative_to_the_recipe(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path, ["data.instructions=[mine.jsonl]"])
    assert recipe.train.lr == 1e-3 and isinstance(recipe.train.lr, float)
    assert recipe.data.code == [str(tmp_path / "recipes" / "src")]
    assert recipe.train.output_dir == str(tmp_path / "recipes" / "out" / "run")
    assert recipe.data.instructions == [str(tmp_path / "mine.jsonl")]  # an override: from cwd
    assert recipe.model.name == "replit/replit-code-v1-3b"  # a hub id stays one
    assert recipe.data.out == str(tmp_path / "recipes" / "out" / "run" / "data")
    assert recipe.data.tokenizer == "replit/replit-code-v1-3b"


def test_a_local_folder_named_like_a_hub_id_is_a_folder(tmp_path):
    (tmp_path / "recipes" / "my" / "base").mkdir(parents=True)
    path = write(tmp_path, GOOD.replace("replit/replit-code-v1-3b", "my/base"))
    assert load_recipe(path).model.name == str(tmp_path / "recipes" / "my" / "base")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            GOOD.replace("  r: 8", "  r: 8\n   alpha: 3"),
            r"r\.yaml, line 8, column \d+: not valid YAML",
        ),
        (
            GOOD.replace("  lr: 1e-3", "  lr: fast"),
            r"r\.yaml, line 10: train\.lr: expected a number",
        ),
        (
            GOOD.replace("  r: 8", "  r: 8\n  dropuot: 0.1"),
            r"line 8: lora\.dropuot: unknown key \(did you mean dropout\?\)",
        ),
        (GOOD.replace("  max_steps: 10", "  max_steps: -5"), r"line 11: train\.max_steps: must be"),
        (
            GOOD.replace("  r: 8", "  r: 8\n  r: 4"),
            r"line 8: lora\.r is set twice \(first on line 7\)",
        ),
        (GOOD.replace("lora:\n  r: 8", "lora:\n  targets: [mlp_up]"), r"'mlp_up' is not one of"),
        (GOOD + "  resume: true\n  overwrite: true\n", r"train\.overwrite: resume and overwrite"),
        ("- a\n- b\n", r"r\.yaml: a recipe is a mapping of sections"),
        (GOOD.replace("seq_len: 512", "seq_len: 1"), r"line 5: data\.seq_len: must be at least 2"),
        (GOOD.replace("code: [src]", "code: []"), r"data\.code: nothing to prepare"),
        (GOOD + "  device: gpu\n", r"train\.device: 'gpu' is not cpu, cuda, cuda:N"),
        (GOOD + "  schedule: step\n", r"train\.schedule: 'step' is not one of 'cosine', 'linear'"),
    ],
)
def test_a_bad_recipe_names_file_line_and_key(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.max_steps=-5",
            r"override 'train\.max_steps=-5': train\.max_steps: must be at least 1",
        ),
        (
            "model.generation.top_p=1.5",
            r"^override 'model\.generation\.top_p=1\.5': model\.generation: unknown key",
        ),
        ("trian.lr=1", r"^override 'trian\.lr=1': trian: unknown key \(did you mean train\?\)"),
        (
            "lora.targets=[Wqkv, mlp_down]",
            r"lora\.targets: 'mlp_down' is not one of .*first release",
        ),
        ("model.tiny.d_model=130", r"model\.tiny\.d_model: 130 is not a multiple of n_heads"),
        ("train", r"expected key\.sub=value"),
        ("train.lr.x=1", r"train\.lr is no section"),
    ],
)
def test_a_bad_override_is_named(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, GOOD), [override])


def test_a_missing_recipe_or_a_folder_is_named(tmp_path):
    for given, problem in [(tmp_path / "nope.yaml", "no such recipe file"), (tmp_path, "a folder")]:
        with pytest.raises(SystemExit) as caught:
            cli(["train", str(given)])
        assert str(caught.value).startswith(f"replit-ft train: {given}: {problem}")


def test_every_key_is_documented_and_listed_by_replit_ft_keys(capsys):
    rows = describe(Recipe)
    assert all(doc for _, _, _, doc in rows), [key for key, _, _, doc in rows if not doc]
    cli(["keys"])
    printed = capsys.readouterr().out
    for key, *_ in rows:
        assert key in printed
    assert "train.overwrite" in printed and "lora.targets" in printed


def test_prep_of_a_recipe_writes_where_train_reads(tmp_path, real_tokenizer_dir, capsys):
    (tmp_path / "recipes" / "src").mkdir(parents=True)
    (tmp_path / "recipes" / "src" / "a.py").write_text("def f(x):\n    return x\n" * 20)
    text = GOOD.replace("replit/replit-code-v1-3b", str(real_tokenizer_dir))
    path = write(tmp_path, text.replace("seq_len: 512", "seq_len: 64"))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # not the recipe's folder: paths still come from the recipe's
    try:
        cli(["prep", str(path), "--quiet"])
    finally:
        os.chdir(cwd)
    target = Path(load_recipe(path).data.out)
    assert target == tmp_path / "recipes" / "out" / "run" / "data"
    assert (target / "manifest.json").is_file()
    assert f"dataset  {target}" in capsys.readouterr().out


def test_prep_flags_are_checked_by_the_same_rules(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        cli(["prep", "--code", "x", "--seq-len", "1", "--out", str(tmp_path / "d")])
    assert "replit-ft prep: --seq-len: must be at least 2, got 1" in str(caught.value)


def test_a_saved_recipe_reloads_to_the_same_recipe(tmp_path):
    from finetune.recipe import recipe_dict, recipe_from_dict

    recipe = load_recipe(write(tmp_path, GOOD))
    saved = yaml.safe_dump(recipe_dict(recipe))
    assert recipe_from_dict(yaml.safe_load(saved), "recipe.yaml") == recipe
