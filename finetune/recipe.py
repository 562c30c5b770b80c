"""Recipes: YAML files of four typed sections, with `key.sub=value` overrides from the command line.

Each key is declared once below (type, default, rule, one line of documentation; the `data`
section is `data_prep.prepare.PrepConfig`), and the whole recipe is checked when it is
loaded, before any data or model work: an unknown key, a wrong type, a value out of range
or a choice that does not exist is an error naming the file and line (or the override) and
the key. `replit-ft keys` prints every key with its documentation.

Paths in a recipe file are relative to that file; paths in overrides are relative to the
current folder. The loaded recipe holds them absolute and fills in the defaults that
depend on other sections (`data.out` = `train.output_dir`/data, `data.tokenizer` =
`model.name`), so `replit-ft prep RECIPE` writes exactly where `replit-ft train RECIPE` reads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.prepare import PrepConfig
from data_prep.settings import SettingError, build, rule_of, setting
from model.attention import ATTN_IMPLS

# The linear layers of replit-code-v1-3b's blocks; mlp_up/mlp_down belong to its first release.
TARGETS = ("Wqkv", "out_proj", "up_proj", "down_proj")


@dataclass
class TinyModel:
    """A random checkpoint written on the fly (offline demo), its tokenizer trained on the data."""

    n_layers: int = setting(2, "Blocks.", minimum=1)
    d_model: int = setting(128, "Width; a multiple of n_heads.", minimum=8)
    n_heads: int = setting(4, "Attention heads.", minimum=1)
    vocab: int = setting(2048, "SentencePiece vocabulary trained on the data's code.", minimum=256)
    std: float = setting(0.02, "Standard deviation of the random weights.", above=0)

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise SettingError(
                "d_model", f"{self.d_model} is not a multiple of n_heads ({self.n_heads})"
            )


@dataclass
class ModelSection:
    name: str = setting(
        "replit/replit-code-v1-3b", "Base checkpoint: hub id or folder.", path="path or hub id"
    )
    quantization: str | None = setting(
        "nf4",
        "4-bit nf4, 8-bit int8, or null for a full-precision base.",
        choices=(None, "nf4", "int8"),
    )
    compute_dtype: str | None = setting(
        None,
        "Compute dtype; null: bf16 on CUDA, fp32 on CPU.",
        choices=(None, "bf16", "fp16", "fp32"),
    )
    attn_impl: str = setting(
        "auto", "Attention backend (see README).", choices=("auto", *ATTN_IMPLS)
    )
    tiny: TinyModel | None = setting(
        None, "Write a tiny random base at `name` first (the offline demo)."
    )


@dataclass
class LoraSection:
    r: int = setting(16, "LoRA rank.", minimum=1)
    alpha: float = setting(32, "LoRA alpha (the update is scaled by alpha / r).", above=0)
    dropout: float = setting(0.05, "Dropout on the LoRA input.", minimum=0, below=1)
    targets: list[str] = setting(
        ["Wqkv", "up_proj", "down_proj"],
        "Projections that get adapters.",
        choices=TARGETS,
        hint=" (mlp_up/mlp_down belong to replit-code-v1-3b's first release)",
    )
    rslora: bool = setting(False, "Rank-stabilized scaling (alpha / sqrt(r)).")
    dora: bool = setting(False, "Weight-decomposed LoRA (DoRA).")

    def check(self) -> None:
        if not self.targets:
            raise SettingError("targets", "name at least one of " + ", ".join(TARGETS))
        if len(set(self.targets)) != len(self.targets):
            raise SettingError("targets", f"lists a projection twice: {self.targets}")


# Train keys a resumed run may change; every other key of the recipe is fixed for a run.
RESUMABLE = ("max_steps", "eval_every", "save_every", "keep_last", "log_every", "wandb", "device")


@dataclass
class TrainSection:
    output_dir: str = setting("runs/replit-ft", "The run folder.", path="path")
    max_steps: int = setting(1000, "Optimizer steps.", minimum=1)
    micro_batch_size: int = setting(1, "Rows per forward pass, per process.", minimum=1)
    grad_accum: int = setting(8, "Micro-batches per optimizer step.", minimum=1)
    lr: float = setting(2e-4, "Peak learning rate.", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", minimum=0)
    warmup_steps: int = setting(20, "Linear warmup steps.", minimum=0)
    schedule: str = setting(
        "cosine", "Learning-rate decay after warmup.", choices=("cosine", "linear")
    )
    optimizer: str = setting(
        "adamw", "paged_adamw_8bit needs CUDA.", choices=("adamw", "paged_adamw_8bit", "lion")
    )
    max_grad_norm: float = setting(1.0, "Gradient clipping norm; 0: off.", minimum=0)
    bf16: bool | None = setting(None, "bf16 autocast; null: where the device supports it.")
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass.")
    offload_activations: bool = setting(
        False, "Keep the checkpointed block inputs in host memory (CUDA; for very long rows)."
    )
    eval_every: int = setting(100, "Steps between evaluations.", minimum=1)
    save_every: int = setting(100, "Steps between checkpoints.", minimum=1)
    keep_last: int = setting(2, "Checkpoints kept.", minimum=1)
    log_every: int = setting(10, "Steps between loss lines in the log.", minimum=1)
    seed: int = setting(0, "Seed of LoRA's initialization and the data order.", minimum=0)
    resume: bool = setting(False, "Continue the run in output_dir from its newest checkpoint.")
    overwrite: bool = setting(False, "Clear output_dir's earlier run and start afresh.")
    wandb: bool = setting(False, "Also log to Weights & Biases (needs wandb).")
    device: str | None = setting(None, "cpu, cuda, cuda:N; null: what the launcher gives.")
    eval_humaneval: int = setting(
        0,
        "HumanEval pass@1 on the first K problems after training; 0: off.",
        minimum=0,
        maximum=164,
    )

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise SettingError("overwrite", "resume and overwrite exclude each other; pick one")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise SettingError("device", f"{self.device!r} is not cpu, cuda, cuda:N or mps")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: PrepConfig = field(default_factory=PrepConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and line, or the override."""


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, resolve and check a recipe file with `key.sub=value` overrides (values are YAML)."""
    path = Path(path)
    if not path.is_file():
        problem = "a folder, not a recipe file" if path.is_dir() else "no such recipe file"
        raise FileNotFoundError(f"{path}: {problem} (the kit's recipes are recipes/*.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start})") from None
    raw, lines = _parse(text, str(path))
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, lora, train)")
    origins = {key: f"{path}, line {line}" for key, line in lines.items()}
    _resolve_paths(Recipe, raw, path.parent.resolve(), ())
    for item in overrides:
        _override(raw, item, origins)
    try:
        recipe = build(Recipe, raw)
    except SettingError as err:
        raise RecipeError(f"{_origin(err.key, origins, str(path))}: {err}") from None
    _fill_defaults(recipe, raw)
    return recipe


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, to save beside a run's outputs."""
    return dataclasses.asdict(recipe)


def recipe_from_dict(values: dict[str, Any], where: str) -> Recipe:
    """A saved, resolved recipe (a run's recipe.yaml) back as a Recipe; `where` names it."""
    try:
        return build(Recipe, values)
    except SettingError as err:
        raise RecipeError(f"{where}: {err}") from None


def _parse(text: str, name: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """YAML data and the line of every key; syntax errors and repeated keys name the line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{name}{where}: not valid YAML ({err.problem or err})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{name}: not valid YAML ({err})") from None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, key: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            sub = (*key, str(key_node.value))
            if sub in lines:
                raise RecipeError(
                    f"{name}, line {key_node.start_mark.line + 1}: {'.'.join(sub)} is set twice "
                    f"(first on line {lines[sub]})"
                )
            lines[sub] = key_node.start_mark.line + 1
            walk(value_node, sub)

    if node is not None:
        walk(node, ())
    return (data if data is not None else {}), lines


class _Loader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but `1e-3` is a float (YAML 1.1 reads it as a string)."""


_Loader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _override(raw: dict[str, Any], item: str, origins: dict[tuple[str, ...], str]) -> None:
    """Apply one `key.sub=value` (value parsed as YAML, paths relative to the current folder)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r}: expected key.sub=value, e.g. train.max_steps=100")
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        if part not in node:  # a section the override brings: errors about it name the override
            origins[tuple(parents[: depth + 1])] = f"override {item!r}"
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(parents[: depth + 1])} is no section")
    try:
        parsed, _ = _parse(value, f"override {item!r}")
    except RecipeError:
        parsed = value  # not YAML on its own (e.g. `a: b`): take it as the text it is
    node[leaf] = parsed
    _resolve_paths(Recipe, raw, Path.cwd(), tuple(key.split(".")))
    origins[tuple(key.split("."))] = f"override {item!r}"


def _resolve_paths(cls: type, raw: Any, base: Path, only: tuple[str, ...]) -> None:
    """Make the path settings in `raw` absolute against `base` (only those under key `only`)."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in raw or (only and only[0] != f.name):
            continue
        section = next(
            (
                t
                for t in (hints[f.name], *typing.get_args(hints[f.name]))
                if dataclasses.is_dataclass(t)
            ),
            None,
        )
        rule = rule_of(cls, f.name)
        if section is not None:
            _resolve_paths(section, raw[f.name], base, only[1:])
        elif rule is not None and rule.path:
            # The tiny demo's base is a folder written on the fly, whatever its name looks like.
            hub_ok = rule.path == "path or hub id" and raw.get("tiny") is None
            raw[f.name] = _absolute(raw[f.name], base, hub_ok)


HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


def _absolute(value: Any, base: Path, hub_ok: bool) -> Any:
    """`value` (a path or a list of them) made absolute against `base`; hub ids kept as they are."""
    if isinstance(value, list):
        return [_absolute(v, base, hub_ok) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if hub_ok and HUB_ID.fullmatch(value) and not (base / value).exists():
        return value
    return os.path.normpath(base / Path(value).expanduser())


def _fill_defaults(recipe: Recipe, raw: dict[str, Any]) -> None:
    """The defaults that depend on another section, written into the recipe so it is complete."""
    recipe.data.out = recipe.data.out or str(Path(recipe.train.output_dir) / "data")
    recipe.data.tokenizer = recipe.data.tokenizer or recipe.model.name


def _origin(key: str, origins: dict[tuple[str, ...], str], default: str) -> str:
    """Where key `a.b.c` (or the nearest section above it) was written."""
    parts = tuple(key.split("."))
    for end in range(len(parts), 0, -1):
        if parts[:end] in origins:
            return origins[parts[:end]]
    return default
