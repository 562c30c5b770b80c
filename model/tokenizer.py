"""The replit-code-v1-3b tokenizer without remote code, id for id identical to SentencePiece.

Why hand-built: `AutoTokenizer` maps model_type "mpt" to the GPT-NeoX vocabulary (wrong ids),
and the published `ReplitLMTokenizer` (remote code) reads its SentencePiece model before loading
it, which crashes on transformers >= 4.34.

Why SentencePiece underneath rather than a `tokenizers` (Rust) Unigram: no Rust Unigram can give
the same ids. sentencepiece 0.2's encoder keeps Viterbi path scores in float32, so near-ties are
settled by rounding that depends on everything before them in the document: the same line can
split differently after 100 or 10,000 characters (24 spaces + "new" or 23 spaces + "▁new"; a
40-space run as 8+32, 10+30 or 9+31). `tokenizers` sums in float64. Its `Precompiled` normalizer
also maps a whole grapheme cluster through its shortest charsmap match, dropping combining marks
that follow a mapped character (sentencepiece takes the longest match). So `ReplitTokenizer`
calls `SentencePieceProcessor` (C++, and a list of texts goes in one multi-threaded call), and
the Rust version is only written as tokenizer.json so plain `AutoTokenizer` can reload a saved
folder, where it agrees with SentencePiece on about 99.9% of tokens, not all.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from itertools import accumulate
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, PaddingStrategy, TruncationStrategy

from model.checkpoint import read_json_object

SPM_FILE = "spiece.model"
TOKENIZERS_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# What a hub download fetches: the published layout and what `save_pretrained` writes.
HUB_FILES = [SPM_FILE, CONFIG_FILE, "special_tokens_map.json", "added_tokens.json"]
# Config keys from the published folder (remote-code class) or from loading; not ours to keep.
DROPPED_KWARGS = (
    "auto_map",
    "sp_model_kwargs",
    "tokenizer_file",
    "special_tokens_pattern",
    "is_local",
    "local_files_only",
)
# What `_encode_plus` hands to `prepare_for_model` unchanged.
PREPARE_KWARGS = (
    "add_special_tokens",
    "max_length",
    "stride",
    "return_token_type_ids",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_length",
    "verbose",
)


def load_tokenizer(name_or_path: str | os.PathLike) -> ReplitTokenizer:
    """Load the tokenizer from a folder holding spiece.model, or from a hub repository id.

    A folder may be the published layout or what `ReplitTokenizer.save_pretrained` wrote.
    Any other name is downloaded from the hub (tokenizer files only, never code).
    """
    path = Path(name_or_path).expanduser()
    if not path.exists() and not _looks_like_path(str(name_or_path)):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
        except Exception as error:  # offline, unknown repository, no access, ...
            raise FileNotFoundError(
                f"{name_or_path}: no such folder, and the hub download failed: {error}"
            ) from error
    if not (path / SPM_FILE).is_file():
        raise FileNotFoundError(
            f"{path / SPM_FILE} not found: the tokenizer needs the SentencePiece model "
            f"(a folder with {SPM_FILE}, as published or as save_pretrained writes it)"
        )
    for name in HUB_FILES[1:]:
        if (path / name).is_file():
            read_json_object(path / name)  # an array or broken JSON would fail deep inside
    try:
        return ReplitTokenizer.from_pretrained(str(path))
    except RuntimeError as err:  # sentencepiece's "could not parse ModelProto"
        raise ValueError(f"{path / SPM_FILE}: not a SentencePiece model ({err})") from err
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise ValueError(f"{path}: tokenizer files unusable ({type(err).__name__}: {err})") from err


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else must be a local path."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


class ReplitTokenizer(PreTrainedTokenizer):
    """transformers tokenizer whose ids, and decoded text, are exactly SentencePiece's.

    No BOS, never an automatic EOS (append `eos_token_id` yourself), and `<|endoftext|>`,
    `<|pad|>` or `<extra_id_3>` written in the text are encoded as the text they are
    (`split_special_tokens=True`): only ids, never strings, make special tokens.
    """

    vocab_files_names = {"vocab_file": SPM_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        unk_token: str = "<|unk|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|pad|>",
        bos_token: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Leftovers of the published config (remote-code class) or of our own saved one.
        for key in DROPPED_KWARGS:
            kwargs.pop(key, None)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("model_max_length", 2048)
        self.vocab_file = str(vocab_file)
        # Loaded before the parent's __init__, which already asks for the vocabulary.
        self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)
        super().__init__(
            unk_token=unk_token,
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            special_tokens_pattern="none",
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> BatchEncoding:
        """Encode with SentencePiece directly, a whole batch in one call, when nothing else
        is asked for; pairs, pre-split words and `split_special_tokens=False` take the
        generic (slow) path."""
        is_batch = isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)
        if (
            text_pair is not None
            or kwargs.get("is_split_into_words")
            or not kwargs.get("split_special_tokens", self.split_special_tokens)
            or not (isinstance(text, str) or (is_batch and text))
        ):
            return super()._encode_plus(text, text_pair, **kwargs)
        if isinstance(text, str):
            return self._prepare(self.sp_model.encode(text), kwargs, single=True)
        batch = self.sp_model.encode(list(text))
        outputs: dict[str, list] = {"input_ids": batch}
        # Nothing to add or cut (the usual data-prep call): skip the per-text Python work.
        if not self._nothing_to_prepare(kwargs):
            outputs = {}
            for ids in batch:
                for key, value in self._prepare(ids, kwargs, single=False).items():
                    outputs.setdefault(key, []).append(value)
        outputs = self.pad(
            outputs,
            padding=kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD).value,
            max_length=kwargs.get("max_length"),
            pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
            padding_side=kwargs.get("padding_side"),
            return_attention_mask=kwargs.get("return_attention_mask"),
        )
        return BatchEncoding(outputs, tensor_type=kwargs.get("return_tensors"))

    @staticmethod
    def _nothing_to_prepare(kwargs: dict[str, Any]) -> bool:
        """No truncation and no extra outputs: `prepare_for_model` would return the ids as is."""
        truncation = kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE)
        extras = ("return_token_type_ids", "return_overflowing_tokens")
        extras += ("return_special_tokens_mask", "return_length")
        return truncation == TruncationStrategy.DO_NOT_TRUNCATE and not any(map(kwargs.get, extras))

    def _prepare(self, ids: list[int], kwargs: dict[str, Any], single: bool) -> BatchEncoding:
        """Special tokens (none), truncation and, for a single text, padding: as the parent."""
        options = {k: kwargs[k] for k in PREPARE_KWARGS if k in kwargs}
        options["truncation"] = kwargs.get("truncation_strategy", "do_not_truncate")
        if single:
            options["padding"] = kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD)
            for key in ("pad_to_multiple_of", "padding_side", "return_tensors"):
                options[key] = kwargs.get(key)
            options["return_attention_mask"] = kwargs.get("return_attention_mask")
        else:
            options["return_attention_mask"] = False  # the batch is padded afterwards
        return self.prepare_for_model(ids, prepend_batch_axis=single, **options)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """SentencePiece's decode (unknown pieces read " ⁇ "); EOS, PAD and added tokens
        read as their text unless `skip_special_tokens`, which also drops UNK."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in skip:
                continue
            if i < self.vocab_size and not self.sp_model.is_control(i):
                run.append(i)
                continue
            parts.append(self.sp_model.decode(run))
            run = []
            parts.append(self.convert_ids_to_tokens(i))
        text = "".join(parts) + self.sp_model.decode(run)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str, ...]:
        """spiece.model (byte for byte, so checksums hold) and the approximate tokenizer.json."""
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        model_file = os.path.join(save_directory, prefix + SPM_FILE)
        proto = self.sp_model.serialized_model_proto()
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(model_file):
                shutil.copyfile(self.vocab_file, model_file)
        else:
            Path(model_file).write_bytes(proto)
        json_file = os.path.join(save_directory, prefix + TOKENIZERS_FILE)
        rust_backend(proto).save(json_file)
        return model_file, json_file

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """Save for `load_tokenizer` (exact) and plain `AutoTokenizer` (tokenizer.json,
        approximate; see the module docstring), with no `auto_map` to remote code."""
        if kwargs.get("push_to_hub"):  # it would upload before the config below is fixed
            raise ValueError("save_pretrained(push_to_hub=True): use push_to_hub(repo_id)")
        files = super().save_pretrained(save_directory, **kwargs)
        prefix = kwargs.get("filename_prefix")
        config_file = Path(save_directory) / ((f"{prefix}-" if prefix else "") + CONFIG_FILE)
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.pop("auto_map", None)
        config.pop("backend", None)
        config["tokenizer_class"] = "TokenizersBackend"
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
        config_file.write_text(text + "\n", encoding="utf-8")
        return files

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the model bytes, not the path: workers may not see the same files.
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(model_proto=state["sp_model"])


NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
# sentencepiece scores a user-defined piece 0.1 per UTF-8 byte minus 0.1 (measured: it is not
# the piece's own score). 0.1 rounded to a multiple of 2**-25 makes splits tie exactly.
TENTH = 3355443 / 2**25
# User-defined pieces nmt_nfkc would turn into spaces; sentencepiece leaves them alone.
PROTECTED = ["\t", "\n", "\r", "\x0b", "\x0c"]
ESCAPE = "\ue000"  # private use, unchanged by nmt_nfkc


# Two segmentations whose scores differ by less than this tie: float32's resolution at
# sentencepiece's score reset threshold (1e5) is 2**-7.
TIE = 0.01


def segmentation_score(ids: list[int], sp: spm.SentencePieceProcessor) -> float:
    """sentencepiece's Viterbi score of one segmentation; a user-defined piece (the only
    pieces scored exactly 0 besides control and unknown ones) counts its length bonus."""

    def piece_score(i: int) -> float:
        score = sp.get_score(i)
        if score == 0 and not (sp.IsControl(i) or sp.IsUnknown(i)):
            return TENTH * (len(sp.id_to_piece(i).encode()) - 1)
        return score

    return sum(map(piece_score, ids))


def differing_segments(
    a: list[int], b: list[int], sp: spm.SentencePieceProcessor
) -> list[tuple[list[int], list[int]]]:
    """Two segmentations of one text cut wherever both have a token boundary: the pieces
    that differ (lengths in normalized characters; an unknown run counts 1)."""

    def ends(ids: list[int]) -> list[int]:
        return list(accumulate(1 if i == 0 else len(sp.id_to_piece(i)) for i in ids))

    ends_a, ends_b = ends(a), ends(b)
    if ends_a[-1:] != ends_b[-1:]:
        raise ValueError("the two segmentations do not cover the same text")
    common = set(ends_a) & set(ends_b)

    def split(ids: list[int], ends_: list[int]) -> list[list[int]]:
        groups, current = [], []
        for i, end in zip(ids, ends_, strict=True):
            current.append(i)
            if end in common:
                groups.append(current)
                current = []
        return groups

    return [(x, y) for x, y in zip(split(a, ends_a), split(b, ends_b), strict=True) if x != y]


def rust_backend(model_proto: bytes) -> Tokenizer:
    """spiece.model as a `tokenizers` Unigram: the closest a Rust tokenizer gets (see top)."""
    pieces, charsmap = _read_model_proto(model_proto)
    lowest = min(score for _, score, kind in pieces if kind == NORMAL)
    unk_id = next(i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN)
    vocab = []
    for piece, score, kind in pieces:
        if kind == USER_DEFINED:
            score = TENTH * (len(piece.encode()) - 1)
        elif kind != NORMAL:  # UNK, EOS, PAD: reachable by id, never by matching text
            score = lowest - 1000
        vocab.append((piece, score))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    # Escape the protected characters around the charsmap, escaping the escape itself first.
    escapes = [(ESCAPE, ESCAPE + "0")] + [(c, f"{ESCAPE}{i}") for i, c in enumerate(PROTECTED, 1)]
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(a, b) for a, b in escapes]
        + [normalizers.Precompiled(charsmap)]
        + [normalizers.Replace(b, a) for a, b in reversed(escapes)]
        + [normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Replace(pieces[unk_id][0], " ⁇ ")]
    )
    return tokenizer


def _read_model_proto(data: bytes) -> tuple[list[tuple[str, float, int]], bytes]:
    """(piece, score, type) of every piece and the normalizer's precompiled charsmap, read
    straight from the protobuf wire format (no protobuf package needed)."""
    pieces, charsmap = [], b""
    for field, value in _fields(data):
        if field == 1:  # SentencePiece {piece = 1; score = 2; type = 3 (default NORMAL)}
            piece = dict(_fields(value))
            score = struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0]
            pieces.append((piece[1].decode(), score, piece.get(3, NORMAL)))
        elif field == 3:  # NormalizerSpec {precompiled_charsmap = 2}
            charsmap = dict(_fields(value)).get(2, b"")
    return pieces, charsmap


def _fields(data: bytes):
    """(field number, value) pairs of one protobuf message: ints, or bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
        else:
            size = {1: 8, 5: 4}.get(wire)
            if size is None:  # length-delimited
                size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        yield key >> 3, value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i
