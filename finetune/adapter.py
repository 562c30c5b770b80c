"""Checks that a LoRA adapter folder fits its base, from file headers only.

Shared by `merge` and `generate`: an adapter trained on another base, with target
modules the model does not have, or with a file missing, is an error naming the file,
the key and the mismatch, found before any weight is loaded.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft.utils.other import get_pattern_key
from transformers import MptConfig

from finetune.run_folder import RECORD, RunFolder, RunFolderError, read_record
from model.checkpoint import (
    expected_shapes,
    read_config,
    resolve_checkpoint,
    tensor_shapes,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's names in adapter_model.safetensors: base_model.model.<layer>.lora_A.weight, ...
LORA_KEY = re.compile(
    r"base_model\.model\.(?P<layer>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)


class AdapterError(ValueError):
    """An adapter that does not fit its base; the message names the file, the key and why."""


@dataclass
class Adapter:
    """A checked adapter folder, its base and what its training run left beside it."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    base: str  # the base as named (--base, or the adapter's base_model_name_or_path)
    base_path: Path
    base_config: MptConfig
    record: dict[str, Any] | None  # replit_ft.json: how it was trained (None: not by this kit)

    @property
    def max_seq_len(self) -> int:
        """The context the adapter was trained at, at least the base's."""
        return max(self.base_config.max_seq_len, (self.record or {}).get("max_seq_len", 0))

    @property
    def recipe(self) -> dict[str, Any] | None:
        return (self.record or {}).get("recipe")

    @property
    def summary(self) -> dict[str, Any] | None:
        return (self.record or {}).get("summary")


def check_adapter(adapter: str | os.PathLike, base: str | os.PathLike | None = None) -> Adapter:
    """Check that a LoRA adapter fits `base` (default: the base it names), reading headers only.

    Every tensor of adapter_model.safetensors must belong to a linear layer of the base
    with matching shapes (lora_A [r, in], lora_B [out, r]), and every target module must
    name a layer the base has: peft itself skips targets that match nothing as long as
    one matches, and fails deep inside torch on a shape mismatch.
    """
    path = Path(adapter)
    if path.is_file():
        folder = f": {path.parent}" if (path.parent / ADAPTER_CONFIG).is_file() else ""
        raise NotADirectoryError(
            f"{path}: a file; an adapter is the folder that holds {ADAPTER_CONFIG}{folder}"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter folder")
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for file in (config_file, weights):
        if not file.is_file():
            inside = RunFolder(path).adapter
            run = f"; {path} is a run folder: its adapter is {inside}" if inside.is_dir() else ""
            raise FileNotFoundError(f"{file}: missing (a peft adapter folder holds it){run}")
    config = _read_json(config_file)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_file}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    trained_on = config.get("base_model_name_or_path")
    if base is None and not trained_on:
        raise AdapterError(f"{config_file}: no base_model_name_or_path; name the base (--base)")
    try:
        base_path = resolve_checkpoint(base if base is not None else trained_on)
    except FileNotFoundError as err:
        hint = "" if base is not None else f" (named by {config_file}; pass the base with --base)"
        raise FileNotFoundError(f"{err}{hint}") from err
    base_config = read_config(base_path)
    base_name = str(base if base is not None else trained_on)
    layers = {
        name.removesuffix(".weight"): shape
        for name, shape in expected_shapes(base_config).items()
        if name.startswith("transformer.blocks.") and len(shape) == 2
    }
    same = not trained_on or trained_on == base_name or _same_dir(trained_on, base_path)
    origin = "" if same else f" (the adapter was trained on {trained_on})"
    targeted = _targeted_layers(config_file, config.get("target_modules"), layers)
    ranks, magnitudes = _check_tensors(weights, layers, targeted, f"{base_name}{origin}")
    _check_settings(config_file, config, ranks, magnitudes)
    if origin:  # shapes fit; a local copy of the same base is the usual reason for other names
        warnings.warn(
            f"{path} was trained on {trained_on}; applying it to {base_name}", stacklevel=2
        )
    return Adapter(path, config, base_name, base_path, base_config, _read_record(path))


def _read_record(path: Path) -> dict[str, Any] | None:
    """The adapter's replit_ft.json, its trained context checked (it sizes the merged model)."""
    try:
        record = read_record(path)
    except RunFolderError as err:
        raise AdapterError(str(err)) from None
    if record is None:
        return None
    length = record.get("max_seq_len")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise AdapterError(
            f"{path / RECORD}: max_seq_len is {length!r}; expected the positive context length "
            "the adapter was trained at"
        )
    return record


def _targeted_layers(file: Path, targets: Any, layers: dict[str, tuple[int, ...]]) -> set[str]:
    """The base's layers that `target_modules` names, each target matching at least one."""
    if isinstance(targets, str):  # peft reads a string as a regular expression over module names
        found = {name for name in layers if re.fullmatch(targets, name)}
        if not found:
            raise AdapterError(f"{file}: target_modules {targets!r} matches no layer of the base")
        return found
    if not isinstance(targets, list) or not targets:
        raise AdapterError(f"{file}: target_modules is {targets!r}; expected a list of names")
    found = set()
    for target in targets:
        matches = {name for name in layers if name == target or name.endswith("." + target)}
        if not matches:
            kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise AdapterError(
                f"{file}: target module {target!r} matches no layer of the base; its linear "
                f"layers are {', '.join(kinds)} (mlp_up/mlp_down belong to replit-code-v1-3b's "
                "first release)"
            )
        found |= matches
    return found


def _check_tensors(
    file: Path, layers: dict[str, tuple[int, ...]], targeted: set[str], base: str
) -> tuple[dict[str, int], set[str]]:
    """lora_A [r, in], lora_B [out, r] and DoRA magnitudes [out] of every targeted layer.

    Returns each targeted layer's rank and the layers that have a DoRA magnitude.
    """
    ranks: dict[str, dict[str, int]] = {}
    magnitudes = set()
    for key, shape in tensor_shapes(file).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA weight this kit can apply")
        layer, kind = match["layer"], match["kind"]
        if layer not in layers:
            raise AdapterError(
                f"{file}: tensor {key!r} is for layer {layer}, which base {base} lacks"
            )
        if layer not in targeted:
            raise AdapterError(
                f"{file}: tensor {key!r} is for layer {layer}, which target_modules leaves out"
            )
        out_features, in_features = layers[layer]
        rank = shape[0] if kind == "lora_A.weight" else shape[-1]
        expected = {
            "lora_A.weight": (rank, in_features),
            "lora_B.weight": (out_features, rank),
            "lora_magnitude_vector": (out_features,),
        }[kind]
        if tuple(shape) != expected:
            raise AdapterError(
                f"{file}: tensor {key!r} has shape {list(shape)}, but layer {layer} of base "
                f"{base} is [{out_features}, {in_features}], so expected {list(expected)}"
            )
        if kind != "lora_magnitude_vector":
            ranks.setdefault(layer, {})[kind.split(".")[0]] = rank
        else:
            magnitudes.add(layer)
    for layer in sorted(targeted):
        found = ranks.get(layer, {})
        if set(found) != {"lora_A", "lora_B"} or found["lora_A"] != found["lora_B"]:
            raise AdapterError(
                f"{file}: layer {layer} is a target but has LoRA ranks {found or 'none'}; "
                "expected lora_A and lora_B of one rank"
            )
    return {layer: found["lora_A"] for layer, found in ranks.items()}, magnitudes


def _check_settings(
    file: Path, config: dict[str, Any], ranks: dict[str, int], magnitudes: set[str]
) -> None:
    """The settings peft applies, against the tensors: with a rank that is not the tensors'
    peft fails deep inside torch, with an alpha that is no number in its arithmetic."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    rank_pattern, alpha_pattern = (
        config.get("rank_pattern") or {},
        config.get("alpha_pattern") or {},
    )
    if not _positive(r, int):
        raise AdapterError(f"{file}: r is {r!r}, expected a positive integer")
    if not isinstance(rank_pattern, dict) or not all(
        _positive(v, int) for v in rank_pattern.values()
    ):
        raise AdapterError(f"{file}: rank_pattern is {rank_pattern!r}; ranks are positive integers")
    if not _positive(alpha, (int, float)):
        raise AdapterError(f"{file}: lora_alpha is {alpha!r}, expected a positive number")
    if not isinstance(alpha_pattern, dict) or not all(
        _positive(v, (int, float)) for v in alpha_pattern.values()
    ):
        raise AdapterError(f"{file}: alpha_pattern is {alpha_pattern!r}; alphas are numbers")
    if config.get("lora_bias"):
        raise AdapterError(f"{file}: lora_bias is true, but the base's linear layers have no bias")
    dora = config.get("use_dora", False)
    if not isinstance(dora, bool):
        raise AdapterError(f"{file}: use_dora is {dora!r}, expected true or false")
    for layer, rank in sorted(ranks.items()):
        try:  # peft's rule: the first pattern that matches the end of the layer's name
            wanted = rank_pattern.get(get_pattern_key(list(rank_pattern), layer), r)
        except re.error as err:
            raise AdapterError(f"{file}: rank_pattern has a bad pattern ({err})") from err
        if rank != wanted:
            raise AdapterError(
                f"{file}: r is {wanted} for layer {layer}, but its tensors have rank {rank}"
            )
        if (layer in magnitudes) != dora:
            has = "has" if layer in magnitudes else "lacks"
            raise AdapterError(
                f"{file}: use_dora is {str(dora).lower()}, but layer {layer} {has} a DoRA magnitude"
            )


def _positive(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and value > 0


def _same_dir(name: str, path: Path) -> bool:
    local = Path(name).expanduser()
    return local.is_dir() and local.resolve() == path.resolve()


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise AdapterError(f"{file}: expected a JSON object")
    return data
