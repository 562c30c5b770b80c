"""`merge`: a trained LoRA adapter folded into its base, written as a plain transformers checkpoint.

The output loads with `model.load_model` and with `AutoModelForCausalLM.from_pretrained`
(transformers' own `MptForCausalLM`, no remote code): config.json (model_type mpt, the
context the adapter was trained at), safetensors weights (sharded with an index above
`max_shard_size`), the tokenizer, generation_config.json and a model card carrying the
training summary and the CC BY-SA 4.0 attribution the base model's license asks for.

The merge happens in fp32 on a full-precision base, never on a 4-bit one (peft's
`merge_and_unload` on a 4-bit base re-quantizes the merged weights); a tensor that holds
inf or NaN once rounded to the output dtype is an error, never written. The folder is
written under a temporary name beside the target (`.OUT.partial-HOST-PID`), fsynced and
renamed at the end, so a failed merge leaves nothing half-written behind; the temporary
folder of a merge that was killed is removed by the next merge into the same place.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import GenerationConfig

from data_prep.files import (
    fsync_tree,
    is_disk_full,
    locked,
    readable_by_others,
    refuse_second,
    remove_stale_temporaries,
    replace_folder,
    temporary_path,
)
from finetune.adapter import ADAPTER_WEIGHTS, Adapter, AdapterError, check_adapter
from finetune.lora import peft_quietly
from finetune.model_card import dtype_name, model_card
from finetune.run_folder import write_record
from model import ReplitForCausalLM, load_model, load_tokenizer
from model.checkpoint import TIED_ALIASES, CheckpointError, expected_shapes, weight_files
from model.loading import parse_dtype


def merge(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "bf16",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge a LoRA adapter into its base and write the checkpoint to `out`; return `out`.

    base: default the adapter's base_model_name_or_path. dtype: of the written weights
    (the merge itself is computed in fp32). max_shard_size: weights above it are split
    into shards with an index. overwrite: replace a non-empty `out`.
    """
    started = time.perf_counter()
    out = Path(out)
    info = check_adapter(adapter, base)
    out_dtype = parse_dtype(dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: a merge writes bf16, fp16 or fp32 (--dtype)")
    shard_bytes = _size_bytes(max_shard_size)
    say = _progress(progress)
    # One merge per --out: a second one would write the same folder again, and swap it in
    # over the first's. (The lock makes out's parent folder.)
    with locked(out, on_busy=refuse_second(out, "merge")):
        for stale in remove_stale_temporaries(out, ("partial", "old")):
            say(f"removed {stale}, left by a merge that was killed")
        _check_out(out, overwrite, [info.path, info.base_path])
        # Before the long load: a base without a tokenizer fails now.
        tokenizer = load_tokenizer(info.base_path)
        tmp = temporary_path(out, "partial")
        tmp.mkdir()
        try:
            say(f"loading {info.base} ({dtype_name(out_dtype)}, max_seq_len {info.max_seq_len})")
            model = merged_model(info, out_dtype, progress)
            say(f"writing {out}")
            model.generation_config = GenerationConfig(
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
            )
            model.save_pretrained(tmp, max_shard_size=shard_bytes)
            _plain_mpt_config(tmp / "config.json")
            tokenizer.save_pretrained(tmp)
            _ready_for_serving(tmp, tokenizer.pad_token_id, info.max_seq_len)
            write_record(tmp, merged_record(info, out_dtype))
            (tmp / "README.md").write_text(model_card(info, out.name, out_dtype))
            _seal(tmp)
            replace_folder(tmp, out)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(err):
                raise OSError(
                    errno.ENOSPC,
                    f"{out.parent}: no space left on the disk; the merged checkpoint needs about "
                    f"{_model_size(info, out_dtype)} there (nothing was written)",
                ) from err
            raise
        say(f"done in {time.perf_counter() - started:.0f} s: {out}")
        return out


OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]B)\s*", re.IGNORECASE)


def _size_bytes(size: int | str) -> int:
    """`max_shard_size` in bytes: a positive int, or a string like "5GB" or "500MB"."""
    count = size
    if isinstance(size, str) and (match := SIZE.fullmatch(size)):
        count = int(float(match[1]) * 1000 ** "KMGT".index(match[2][0].upper()) * 1000)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(
            f"max_shard_size {size!r}: expected a size like 5GB or 500MB (--max-shard-size)"
        )
    return count


def merged_model(info: Adapter, dtype: torch.dtype, progress: bool = True) -> ReplitForCausalLM:
    """The adapter merged into its base in memory, as `merge` writes it (and `export` reads it).

    At the adapter's trained context, on CPU even beside a GPU: the fp32 originals are read
    there, and the merge is a few matrix products per layer. `dtype` is the merged
    weights'; a tensor that is not finite in it is an error (see `_check_finite`).
    """
    model = load_model(
        info.base_path, compute_dtype=dtype, max_seq_len=info.max_seq_len, device="cpu"
    )
    with _original_weights(info.base_path) as original:
        model = _merge_in_fp32(model, info, dtype, original, progress)
        _check_finite(model, dtype, original, info)
    return model


def _merge_in_fp32(
    model: ReplitForCausalLM,
    info: Adapter,
    dtype: torch.dtype,
    original: Callable[[str], torch.Tensor],
    progress: bool,
) -> ReplitForCausalLM:
    """peft merges each LoRA layer into the base weight as stored, in fp32, then casts to `dtype`.

    Hand-written around peft's own per-layer `merge()` for memory and precision: the model
    is loaded in the output dtype (5.2 GB in bf16, not 10.4 GB in fp32), and each target
    weight is swapped for its fp32 original from the checkpoint just before its merge, so
    the result is round(W + BA * scale) rather than a sum of two rounded terms.
    """
    with peft_quietly():
        peft_model = PeftModel.from_pretrained(model, str(info.path))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in tqdm(layers, desc="merge", unit="layer", disable=not progress):
        weight = layer.get_base_layer().weight
        weight.data = original(f"{name}.weight").to(torch.float32, copy=True)
        if not torch.isfinite(weight.data).all():
            raise _base_not_finite(info, f"{name}.weight")
        layer.merge()
        if not torch.isfinite(weight.data).all():
            raise AdapterError(
                f"{info.path / ADAPTER_WEIGHTS}: merged into {name}.weight it gives inf or NaN "
                "even in fp32; the adapter's weights are broken (inf, NaN or huge)"
            )
        weight.data = weight.data.to(dtype)
    return peft_model.unload()


def _check_finite(
    model: ReplitForCausalLM,
    dtype: torch.dtype,
    original: Callable[[str], torch.Tensor],
    info: Adapter,
) -> None:
    """Refuse to write a tensor holding inf or NaN once rounded to the output dtype.

    A value beyond fp16's range (65504) becomes inf when rounded, silently; a base that
    already holds inf or NaN is named as the cause instead.
    """
    for name, tensor in model.state_dict().items():
        if torch.isfinite(tensor).all():
            continue
        if not torch.isfinite(original(name)).all():
            raise _base_not_finite(info, name)
        wider = {torch.float16: "bf16", torch.bfloat16: "fp32"}.get(dtype)
        hint = f"; merge with --dtype {wider} (dtype='{wider}')" if wider else ""
        raise ValueError(
            f"tensor {name!r} has values beyond {dtype_name(dtype)}'s range after the merge, "
            f"which would be written as inf{hint}"
        )


def _base_not_finite(info: Adapter, name: str) -> CheckpointError:
    return CheckpointError(f"{info.base_path}: tensor {name!r} of the base holds inf or NaN")


@contextmanager
def _original_weights(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """`with _original_weights(path) as read: read(name)`: one base tensor as stored, on demand."""
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    with ExitStack() as stack:
        for file in weight_files(path):
            if file.suffix == ".safetensors":
                handle = stack.enter_context(safe_open(file, framework="pt"))
                readers |= {k: (lambda h=handle, k=k: h.get_tensor(k)) for k in handle.keys()}
            else:  # mmap: each tensor is read from the page cache when used, not all at once
                mmap = zipfile.is_zipfile(file)  # the legacy format cannot be mapped
                state = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
                readers |= {k: (lambda v=v: v) for k, v in state.items()}
        readers = {TIED_ALIASES.get(k, k): read for k, read in readers.items()}
        yield lambda name: readers[name]()


def _check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out}: not empty; refusing to overwrite it (--overwrite replaces it)"
        )
    for path in inputs:
        if out.resolve() in (path.resolve(), *path.resolve().parents):
            raise ValueError(f"{out}: holds {path}, which this merge reads; write elsewhere")


def _seal(folder: Path) -> None:
    """Every file readable by others (safetensors writes 0600), all of it flushed to disk."""
    readable_by_others(folder)
    fsync_tree(folder)


def _model_size(info: Adapter, dtype: torch.dtype) -> str:
    """Size of the base's weights in `dtype`, what the merged safetensors take on disk."""
    size = sum(math.prod(s) for s in expected_shapes(info.base_config).values()) * dtype.itemsize
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{max(size / 1e6, 1):.0f} MB"


def merged_record(info: Adapter, dtype: torch.dtype) -> dict[str, Any]:
    """The merged folder's replit_ft.json: the adapter's record, its context and the merge."""
    return (info.record or {}) | {
        "base": info.base,
        "max_seq_len": info.max_seq_len,
        "merged": {"adapter": str(info.path.resolve()), "dtype": dtype_name(dtype)},
    }


def _plain_mpt_config(file: Path) -> None:
    """Point config.json at transformers' MptForCausalLM, with no auto_map to remote code."""
    config = json.loads(file.read_text())
    config.pop("auto_map", None)
    config["architectures"] = ["MptForCausalLM"]
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _ready_for_serving(folder: Path, pad_id: int, max_seq_len: int) -> None:
    """What serving engines read besides the weights: the pad id in config.json and the
    trained context as the tokenizer's model_max_length (its config says 2048 otherwise,
    and transformers warns past it).

    `architectures` stays transformers' `MptForCausalLM`, which vLLM registers too
    (beside `MPTForCausalLM`). llama.cpp's converter knows only `MPTForCausalLM`, but
    renaming buys nothing: it then fails for want of tokenizer.model, and given one, it
    writes a vocabulary llama.cpp crashes on. `replit-ft export gguf` writes the GGUF.
    """
    config_file, tokenizer_file = folder / "config.json", folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token_id"] = pad_id
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer_config["model_max_length"] = max_seq_len
    text = json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False)
    tokenizer_file.write_text(text + "\n", encoding="utf-8")


def _progress(enabled: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return say
