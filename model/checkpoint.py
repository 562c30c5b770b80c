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
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import MptConfig

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
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


def read_config(path: Path) -> MptConfig:
    """The MPT config of a checkpoint, refusing variants the kit's network does not implement."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if raw.get("model_type") != "mpt":
        raise CheckpointError(
            f"{file}: model_type is {raw.get('model_type')!r}, expected 'mpt' (replit-code-v1-3b)"
        )
    config = MptConfig.from_dict(raw)
    attn = config.attn_config
    unsupported = {
        "attn_config.alibi": (attn.alibi, True),
        "attn_config.qk_ln": (attn.qk_ln, False),
        "attn_config.clip_qkv": (attn.clip_qkv, None),
        "attn_config.prefix_lm": (attn.prefix_lm, False),
        "no_bias": (config.no_bias, True),
        "logit_scale": (config.logit_scale, None),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise CheckpointError(f"{file}: {key}={value!r} is not supported (expected {wanted!r})")
    return config


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
        try:
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{file}: not a weight index ({err!r})") from err
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{file}: lists shard {path / missing[0]}, which is missing")
        return [path / s for s in shards]
    raise FileNotFoundError(f"{path}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in one weight file, reading no tensor data."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        SafetensorError,
    ) as err:
        raise CheckpointError(f"{file}: unreadable, truncated or corrupt ({err})") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{file}: refused by weights_only loading ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return {k: tuple(v.shape) for k, v in state.items()}


def check_weights(path: Path, config: MptConfig) -> list[Path]:
    """Check every weight file against the config: names, shapes, nothing missing."""
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
                    f"{file}: tensor {key!r} has shape {list(shape)}, "
                    f"config.json implies {list(expected[name])}"
                )
            seen.setdefault(name, file)
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{files[0]}: missing tensor {missing[0]!r}{more}")
    return files
