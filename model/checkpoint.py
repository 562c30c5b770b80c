"""Find, read and check a checkpoint in the published layout before anything is loaded.

The published replit-code-v1-3b is `config.json` (model_type mpt) plus one fp32
`pytorch_model.bin`; merged checkpoints of this kit are safetensors, possibly sharded
with an index. transformers' loader does the actual materialization (dtype
conversion tensor by tensor, bitsandbytes quantization), but on a bad checkpoint it
either initializes missing tensors at random with a warning or fails deep inside
torch. Everything here reads headers only and turns each problem into an error that
names the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import MptConfig

# transformers' order of preference: a stale index beside a single file is not what it reads.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "spiece.model", "*.md"]
# A checkpoint written by a stock transformers MPT may carry the tied output matrix too.
TIED_ALIASES = {"lm_head.weight": "transformer.wte.weight"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is, otherwise a hub id downloaded (config, weights, tokenizer)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1 or str(name_or_path).startswith("."):
        raise FileNotFoundError(f"{name_or_path}: not a checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS))


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; anything else (not UTF-8, not JSON, an array) names the file."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{file}: not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    except RecursionError as err:
        raise CheckpointError(f"{file}: JSON nested too deeply") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds a JSON {_json_type(data)}, expected an object")
    return data


def read_config(path: Path) -> MptConfig:
    """The MPT config of a checkpoint, refusing variants the kit's network does not implement.

    Dimensions and attention settings are checked here, before transformers reads them:
    its own checks fail later and deep (`n_heads` not dividing `d_model` is a reshape
    error at the first forward) or name no file.
    """
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a checkpoint directory needs config.json)")
    raw = read_json_object(file)
    if raw.get("model_type") != "mpt":
        raise CheckpointError(
            f"{file}: model_type is {raw.get('model_type')!r}, expected 'mpt' (replit-code-v1-3b)"
        )
    _check_dimensions(file, raw)
    if "quantization_config" in raw:
        raise CheckpointError(
            f"{file}: has a quantization_config; pre-quantized checkpoints are not supported "
            "(load the full-precision one with quantization='nf4' or 'int8')"
        )
    attn = raw.get("attn_config", {})
    if not isinstance(attn, dict):
        kind = _json_type(attn)
        raise CheckpointError(f"{file}: attn_config is a JSON {kind}, expected an object")
    for key, value, allow_none in (
        ("attn_config.alibi_bias_max", attn.get("alibi_bias_max", 8), False),
        ("attn_config.softmax_scale", attn.get("softmax_scale"), True),
        ("layer_norm_epsilon", raw.get("layer_norm_epsilon", 1e-5), False),
    ):
        if not (value is None and allow_none or _is_number(value) and 0 < value < math.inf):
            none = " or null" if allow_none else ""
            raise CheckpointError(f"{file}: {key} is {value!r}, expected a positive number{none}")
    supported = {
        "attn_config.alibi": (attn.get("alibi", False), {True}),
        "attn_config.attn_type": (attn.get("attn_type", "multihead_attention"), MULTIHEAD),
        "attn_config.qk_ln": (attn.get("qk_ln", False), {False}),
        "attn_config.clip_qkv": (attn.get("clip_qkv"), {None}),
        "attn_config.prefix_lm": (attn.get("prefix_lm", False), {False}),
        "no_bias": (raw.get("no_bias", True), {True}),
        "logit_scale": (raw.get("logit_scale"), {None}),
        "norm_type": (raw.get("norm_type", "low_precision_layernorm"), LAYER_NORMS),
    }
    for key, (value, wanted) in supported.items():
        if not any(value is w or value == w and type(value) is type(w) for w in wanted):
            expected = " or ".join(repr(w) for w in sorted(wanted, key=repr))
            raise CheckpointError(f"{file}: {key}={value!r} is not supported (expected {expected})")
    try:
        return MptConfig.from_dict(raw)
    except (StrictDataclassError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{file}: not a valid MPT config ({err})") from err


# Dimensions of the network, each a positive integer; every one of them sizes a weight.
DIMENSIONS = ("d_model", "n_heads", "n_layers", "expansion_ratio", "vocab_size", "max_seq_len")
MULTIHEAD = {"multihead_attention"}  # multi-query MPTs have another Wqkv shape
LAYER_NORMS = {"low_precision_layernorm", "layernorm"}  # the same function, fp32 or not


def _check_dimensions(file: Path, raw: dict[str, Any]) -> None:
    for key in DIMENSIONS:
        if key not in raw:
            raise CheckpointError(f"{file}: no {key} (an MPT config.json gives it)")
        value = raw[key]
        if type(value) is not int or value < 1:
            raise CheckpointError(f"{file}: {key} is {value!r}, expected a positive integer")
    if raw["d_model"] % raw["n_heads"]:
        raise CheckpointError(
            f"{file}: n_heads {raw['n_heads']} does not divide d_model {raw['d_model']}; "
            "each head gets d_model / n_heads channels"
        )


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def expected_shapes(config: MptConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the published state dict with its shape."""
    d, hidden = config.d_model, config.expansion_ratio * config.d_model
    shapes = {"transformer.wte.weight": (config.vocab_size, d), "transformer.norm_f.weight": (d,)}
    for i in range(config.n_layers):
        p = f"transformer.blocks.{i}."
        shapes |= {
            p + "norm_1.weight": (d,),
            p + "attn.Wqkv.weight": (3 * d, d),
            p + "attn.out_proj.weight": (d, d),
            p + "norm_2.weight": (d,),
            p + "ffn.up_proj.weight": (hidden, d),
            p + "ffn.down_proj.weight": (d, hidden),
        }
    return shapes


def weight_files(path: Path) -> list[Path]:
    """The weight files transformers will read, in its order of preference."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        shards = sorted(set(read_weight_map(file).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{file}: lists shard {path / missing[0]}, which is missing")
        return [path / s for s in shards]
    raise FileNotFoundError(f"{path}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's weight_map, tensor name to a shard file of the index's own folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is {weight_map!r}, expected tensor: shard file")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index}: weight_map[{key!r}] is {shard!r}, expected a file name in this folder"
            )
    return weight_map


# Weights of any floating-point precision are converted to the compute dtype at load;
# anything else (int32, bool, fp8 without its scales) would be converted silently to garbage.
FLOATING_SAFETENSORS = {"F64", "F32", "F16", "BF16"}
FLOATING_TORCH = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in one weight file, reading no tensor data.

    Every tensor must be floating point: a checkpoint or adapter with integer weights is
    refused here, naming the file and the tensor.
    """
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                header = {k: (t.get_dtype(), tuple(t.get_shape())) for k, t in slices.items()}
        else:  # transformers reads a zip-format .bin with mmap, the legacy pickle format whole
            mmap = zipfile.is_zipfile(file)
            state = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(f"{file}: refused by weights_only loading ({err})") from err
        raise CheckpointError(f"{file}: unreadable, truncated or corrupt ({err})") from err
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        SafetensorError,
    ) as err:
        reason = str(err) or ("it ends early" if isinstance(err, EOFError) else repr(err))
        raise CheckpointError(f"{file}: unreadable, truncated or corrupt ({reason})") from err
    if file.suffix == ".safetensors":
        _check_floating(file, {k: d for k, (d, _) in header.items()}, FLOATING_SAFETENSORS)
        return {k: shape for k, (_, shape) in header.items()}
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor "
                "(a state dict maps tensor names to tensors)"
            )
    _check_floating(file, {k: v.dtype for k, v in state.items()}, FLOATING_TORCH)
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_floating(file: Path, dtypes: dict[str, Any], floating: set[Any]) -> None:
    for key, dtype in dtypes.items():
        if dtype not in floating:
            raise CheckpointError(
                f"{file}: tensor {key!r} is {str(dtype).removeprefix('torch.')}; weights must "
                "be floating point (fp32, fp16, bf16 or fp64)"
            )


def check_weights(path: Path, config: MptConfig) -> list[Path]:
    """Check every weight file against the config: names, shapes, dtypes, nothing missing.

    A sharded checkpoint's index must say truly where each tensor is (transformers trusts
    it), and no tensor may be in two files.
    """
    files = weight_files(path)
    expected = expected_shapes(config)
    seen: dict[str, Path] = {}
    for file in files:
        for key, shape in tensor_shapes(file).items():
            name = TIED_ALIASES.get(key, key)
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {key!r} {list(shape)}")
            if shape != expected[name]:
                raise CheckpointError(
                    f"{file}: tensor {key!r} has shape {list(shape)}, config.json implies "
                    f"{list(expected[name])} ({SIZED_BY[name.rsplit('.', 2)[-2]]})"
                )
            if key in seen:
                raise CheckpointError(f"{file}: tensor {key!r} is also in {seen[key]}")
            seen[key] = file
    found = {TIED_ALIASES.get(k, k) for k in seen}
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{files[0]}: missing tensor {missing[0]!r}{more}")
    index = next(path / n for n in WEIGHT_FILES if (path / n).is_file())
    if index.name.endswith(".index.json"):
        for key, shard in read_weight_map(index).items():
            if key not in seen:
                raise CheckpointError(f"{index}: lists tensor {key!r}, which no shard holds")
            if shard != seen[key].name:
                raise CheckpointError(f"{index}: puts {key!r} in {shard}, but it is in {seen[key]}")
    return files


# The config keys that size each weight, by the name's last module.
SIZED_BY = {
    "wte": "vocab_size x d_model",
    "Wqkv": "3 d_model x d_model",
    "out_proj": "d_model x d_model",
    "up_proj": "expansion_ratio d_model x d_model",
    "down_proj": "d_model x expansion_ratio d_model",
    "norm_1": "d_model",
    "norm_2": "d_model",
    "norm_f": "d_model",
}
