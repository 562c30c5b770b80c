"""`export gguf`: a merged checkpoint (or an adapter, merged in memory) as one GGUF file.

The file is what llama.cpp (and what builds on it: llama-cpp-python, Ollama, LM Studio)
loads as its "mpt" architecture: ALiBi with the config's bias max, the context the model
was trained at, tied embeddings (no output tensor), LayerNorm without biases, and the
SentencePiece vocabulary for llama.cpp's Unigram tokenizer (finetune/gguf_vocab.py says what
that translation involves). It is written with the `gguf` package, llama.cpp's own writer,
tensor by tensor: a merged folder is streamed from its files, never loaded whole.

Written by hand rather than through llama.cpp's convert_hf_to_gguf.py, which for this model
tries a GPT-2 BPE vocabulary first, then writes a SentencePiece one llama.cpp crashes on,
with pad id 3 and a leading space, and does not know transformers' `MptForCausalLM` name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tqdm.auto import tqdm
from transformers import MptConfig

from data_prep.files import (
    fsync,
    locked,
    refuse_second,
    remove_stale_temporaries,
    temporary_path,
    umask,
)
from finetune.gguf_vocab import GGUFVocab, gguf_vocab
from finetune.run_folder import RECORD, read_record
from model.checkpoint import (
    TIED_ALIASES,
    check_weights,
    expected_shapes,
    read_config,
    resolve_checkpoint,
)

SPM_FILE = "spiece.model"
# --type: the 2-D weights' type, the file type llama.cpp reports, the dtype to merge in.
TYPES = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16, torch.float16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16, torch.bfloat16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, torch.bfloat16),
}
FIM_KEYS = {
    "prefix_id": gguf.Keys.Tokenizer.FIM_PRE_ID,
    "suffix_id": gguf.Keys.Tokenizer.FIM_SUF_ID,
    "middle_id": gguf.Keys.Tokenizer.FIM_MID_ID,
}


class ExportError(ValueError):
    """A checkpoint that cannot be written as GGUF; the message names the file or tensor."""


@dataclass
class _Source:
    """What the GGUF is made of: the model's config, its tensors and the folders beside it."""

    name: str
    config: MptConfig
    vocab: GGUFVocab
    fim: dict[str, int] | None  # the FIM sentinel ids, when trained with FIM
    read: Callable[[str], torch.Tensor]  # checkpoint tensor name -> tensor


def export_gguf(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    weight_type: str = "f16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `model` (a merged checkpoint folder) or `adapter` (merged into `base`, default
    the base it names, in memory) to the GGUF file `out`; return `out`.

    weight_type: of the 2-D weights, "f16", "bf16" or "q8_0" (norms stay f32). The file appears
    complete or not at all (written beside `out` under a temporary name, then renamed);
    an existing `out` is replaced only with `overwrite`.
    """
    if (model is None) == (adapter is None):
        raise ValueError("give either --model (a merged folder) or --adapter, not both")
    if weight_type not in TYPES:
        raise ValueError(f"unknown --type {weight_type!r}; use one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise FileExistsError(f"{out}: is a folder; --out names the .gguf file to write")
    # One export per --out: a second would write it again.
    with locked(out, on_busy=refuse_second(out, "export")):
        remove_stale_temporaries(out, ("partial",))  # of exports that were killed
        if out.exists() and not overwrite:
            raise FileExistsError(
                f"{out}: exists; refusing to overwrite it (--overwrite replaces it)"
            )
        qtype, file_type, merge_dtype = TYPES[weight_type]
        with _open_source(model, adapter, base, merge_dtype, progress) as source:
            tmp = temporary_path(out, "partial")
            try:
                _write(tmp, source, qtype, file_type, progress)
                os.chmod(tmp, 0o666 & ~umask())
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        fsync(out.parent)
    return out


@contextmanager
def _open_source(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike | None,
    base: str | os.PathLike | None,
    dtype: torch.dtype,
    progress: bool,
) -> Iterator[_Source]:
    """Everything is checked (files, names, shapes, vocabulary, FIM ids) before the long
    part: merging an adapter, or reading a merged folder's tensors one by one."""
    if adapter is not None:
        from finetune.adapter import check_adapter
        from finetune.merge import merged_model

        info = check_adapter(adapter, base)
        vocab = _vocab(info.base_path, info.base_config.vocab_size)
        fim = read_fim(info.path, len(vocab.tokens))
        merged = merged_model(info, dtype, progress)
        state = merged.state_dict()
        name = info.path.parent.name if info.path.name == "adapter" else info.path.name
        yield _Source(name, merged.config, vocab, fim, state.__getitem__)
        return
    from finetune.merge import _original_weights

    path = resolve_checkpoint(model)
    if (path / "adapter_config.json").is_file():
        raise ExportError(f"{path}: is a LoRA adapter, not a merged checkpoint; use --adapter")
    config = read_config(path)
    check_weights(path, config)
    vocab = _vocab(path, config.vocab_size)
    fim = read_fim(path, len(vocab.tokens))
    aliases = {name: alias for alias, name in TIED_ALIASES.items()}
    with _original_weights(path) as read:

        def read_or_alias(name: str) -> torch.Tensor:
            try:
                return read(name)
            except KeyError:  # check_weights accepted it under its tied alias
                return read(aliases[name])

        yield _Source(path.resolve().name, config, vocab, fim, read_or_alias)


def _vocab(folder: Path, rows: int) -> GGUFVocab:
    model_file = folder / SPM_FILE
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{model_file}: missing; the GGUF carries the SentencePiece vocabulary "
            f"(a merged folder holds {SPM_FILE})"
        )
    return gguf_vocab(model_file, rows)


def read_fim(folder: Path, vocab_size: int) -> dict[str, int] | None:
    """The FIM sentinel ids of `folder/replit_ft.json` ("fim": {prefix_id, suffix_id,
    middle_id, ...}), or None when the file is absent or the run trained without FIM."""
    file = folder / RECORD
    fim = (read_record(folder) or {}).get("fim")
    if fim is None:
        return None
    if not isinstance(fim, dict):
        raise ExportError(f"{file}: fim is {fim!r}, expected null or an object")
    ids = {}
    for key in FIM_KEYS:
        value = fim.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise ExportError(
                f"{file}: fim.{key} is {value!r}, expected a token id below {vocab_size}"
            )
        ids[key] = value
    return ids


def _write(
    path: Path,
    source: _Source,
    qtype: Q,
    file_type: gguf.LlamaFileType,
    progress: bool,
) -> None:
    config = source.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MPT])
    writer.add_name(source.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.expansion_ratio * config.d_model)
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_max_alibi_bias(float(config.attn_config.alibi_bias_max))
    _add_vocab(writer, source.vocab, source.fim)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MPT, config.n_layers)
    plan = []  # (checkpoint name, GGUF name, type)
    for name, shape in expected_shapes(config).items():
        tensor_type = _tensor_type(shape, qtype)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:  # expected_shapes and gguf's MPT map disagree: a kit bug
            raise ExportError(f"{name}: no GGUF name for this tensor in gguf's MPT map")
        writer.add_tensor_info(
            gguf_name, shape, np.dtype(np.float32), _nbytes(shape, tensor_type), tensor_type
        )
        plan.append((name, tensor_type))
    total = sum(math.prod(s) for s in expected_shapes(config).values())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=total, desc="gguf", unit="param", unit_scale=True, disable=not progress)
        with bar:
            for name, tensor_type in plan:
                tensor = source.read(name)
                writer.write_tensor_data(_encode(name, tensor, tensor_type))
                bar.update(tensor.numel())
        writer.flush()
        os.fsync(writer.fout[0].fileno())
    finally:
        writer.close()


def _add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab, fim: dict[str, int] | None) -> None:
    writer.add_tokenizer_model("t5")  # llama.cpp's name for its SentencePiece Unigram
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if vocab.charsmap:
        writer.add_precompiled_charsmap(vocab.charsmap)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    for key, value in (fim or {}).items():
        writer.add_uint32(FIM_KEYS[key], value)


def _tensor_type(shape: tuple[int, ...], qtype: Q) -> Q:
    """Norms stay f32 (as llama.cpp's converter keeps 1-D tensors); q8_0 needs rows that are
    whole 32-value blocks, else that tensor is f16."""
    if len(shape) == 1:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def _nbytes(shape: tuple[int, ...], tensor_type: Q) -> int:
    return math.prod(gguf.quants.quant_shape_to_byte_shape(shape, tensor_type))


def _encode(name: str, tensor: torch.Tensor, tensor_type: Q) -> np.ndarray:
    """The tensor's bytes in `tensor_type`, refusing values that are not finite or do not
    fit (a float16 file cannot hold a weight beyond 65504: say so, rather than write inf)."""
    if not torch.isfinite(tensor).all():
        raise ExportError(f"tensor {name!r} holds NaN or inf; nothing sensible to export")
    if tensor_type == Q.F32:
        return tensor.float().numpy()
    if tensor_type == Q.BF16:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    if tensor_type == Q.F16:
        half = tensor.to(torch.float16)
        if not torch.isfinite(half).all():
            raise ExportError(
                f"tensor {name!r} has values beyond float16's range (|x| > 65504); "
                "export with --type bf16 or q8_0"
            )
        return half.numpy()
    return gguf.quants.quantize(tensor.float().numpy(), tensor_type)
