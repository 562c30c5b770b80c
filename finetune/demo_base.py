"""The offline demo's base model: a tiny random MPT whose tokenizer is trained on the recipe's code.

Written once, when `model.tiny` is set and `model.name` holds no checkpoint yet, under a
temporary name and renamed into place, so a run killed while writing it leaves none.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from data_prep.code import collect_code
from data_prep.files import remove_stale_temporaries, temporary_path
from finetune.recipe import Recipe
from model.random_checkpoint import write_checkpoint


def ensure_tiny_base(recipe: Recipe) -> None:
    """Write the recipe's tiny base at `model.name` unless a checkpoint is already there."""
    tiny, target = recipe.model.tiny, Path(recipe.model.name)
    if tiny is None or (target / "config.json").is_file():
        return
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"model.name {target}: not empty and holds no checkpoint; the tiny base is written "
            "there, so point model.name at a new folder"
        )
    corpus = collect_code(
        recipe.data.code, include=recipe.data.include, exclude=recipe.data.exclude
    )
    lines = [line for doc in corpus.documents for line in doc.completion.splitlines(True)]
    if not lines:
        raise ValueError(f"data.code {recipe.data.code}: no code to train the tiny tokenizer on")
    remove_stale_temporaries(target, ("tmp",))
    tmp = temporary_path(target, "tmp")
    try:
        write_checkpoint(
            tmp,
            n_layers=tiny.n_layers,
            d_model=tiny.d_model,
            n_heads=tiny.n_heads,
            vocab=tiny.vocab,
            tokenizer=lines,
            seed=recipe.train.seed,
            std=tiny.std,
        )
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
