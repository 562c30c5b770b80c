"""Recipes: YAML files of typed sections, with `key.sub=value` overrides from the command line.

Every key must be a known field: a typo (`lora.rnak=8`) is an error that names it,
never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.prepare import PrepConfig


@dataclass
class TinyModel:
    """A random checkpoint written on the fly (offline demo), its tokenizer trained on the data."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    vocab: int = 2048
    std: float = 0.02


@dataclass
class ModelSection:
    name: str = "replit/replit-code-v1-3b"
    quantization: str | None = "nf4"
    compute_dtype: str | None = None  # bf16 on CUDA, fp32 on CPU
    attn_impl: str = "auto"
    tiny: TinyModel | None = None


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["Wqkv", "up_proj", "down_proj"])
    rslora: bool = False
    dora: bool = False


@dataclass
class TrainSection:
    output_dir: str = "runs/replit-ft"
    max_steps: int = 1000
    micro_batch_size: int = 1
    grad_accum: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit (CUDA) | lion
    max_grad_norm: float = 1.0
    bf16: bool | None = None  # autocast; default: when the device supports it
    gradient_checkpointing: bool = True
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    wandb: bool = False
    device: str | None = None
    eval_humaneval: int = 0  # pass@1 on the first K HumanEval problems after training; 0: off


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: PrepConfig = field(default_factory=lambda: PrepConfig(out=""))
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return _build(Recipe, raw, "")


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, to save beside a run's outputs."""
    return dataclasses.asdict(recipe)


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'recipe'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(values) - set(names)):
        keys = ", ".join(f"{where}{k}" for k in unknown)
        raise ValueError(
            f"unknown recipe key {keys}; {where or 'top level'} has: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, f"{where}{name}")
    if cls is PrepConfig and "out" not in kwargs:
        kwargs["out"] = ""
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint) or hint
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, key) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (int, float, str, bool) and not isinstance(value, origin):
        raise ValueError(f"{key}: expected {origin.__name__}, got {value!r}")
    if origin is int and isinstance(value, bool):
        raise ValueError(f"{key}: expected int, got {value!r}")
    return value
