"""spiece.model as llama.cpp's Unigram tokenizer reads it from a GGUF (tokenizer.ggml.*).

llama.cpp has two tokenizers for SentencePiece vocabularies. Its "llama" (SPM) one expects
byte-fallback pieces, which replit-code-v1-3b's vocabulary lacks (it crashes on the first
`tokenize`); its "t5" (UGM) one is a port of SentencePiece's own Unigram Viterbi with the
precompiled normalization, and is the one written here. Three things differ from
SentencePiece and are translated by hand, because no converter does it (llama.cpp's own
writes user-defined pieces as plain tokens, pad id 3 and a leading space):

- User-defined pieces. llama.cpp splits them out of the text before its Viterbi (as
  transformers does with added tokens) and decodes them verbatim. SentencePiece instead
  weighs them inside the Viterbi with a bonus of 0.1 per UTF-8 byte minus 0.1
  (`GetUserDefinedScore`), so `"    return"` becomes 3 spaces + `▁return` where the bonus
  says so, and 9 tabs may split 2 + 7. Written as user-defined, the space runs (stored as
  `▁▁▁▁`) would also decode as `▁` characters. So the whitespace runs are written as normal
  pieces carrying exactly that bonus as their score; the other user-defined pieces
  (`<extra_id_N>`), where splitting first gives the same ids, stay user-defined.
- Normalization. SentencePiece leaves a user-defined piece's text unnormalized, but nmt_nfkc
  maps tab, newline, CR and form feed to a space and drops vertical tab. With those pieces
  now normal, the precompiled charsmap llama.cpp reads must not map these characters: their
  entries are cut out of its double array (`_unmap`).
- Special ids: unk 0, eos 1, pad 2, no BOS, no EOS appended, no leading space (the GGUF's
  keys; llama.cpp's defaults for "t5" are pad 0, unk 2 and an appended EOS).

What stays different, and cannot be fixed from the file: SentencePiece 0.2 keeps Viterbi path
scores in float32, llama.cpp in float64. Where two segmentations score within float32
rounding of each other (long space runs, `N spaces + new` against `N-1 spaces + ▁new`), the
float32 sum rounds differently deep into a long document, so the ids can differ there; the
text they decode to is the same. bench/gguf.py measures how often.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

Piece = sp_pb2.ModelProto.SentencePiece
UNIGRAM = sp_pb2.TrainerSpec.UNIGRAM
SPACE = "▁"  # SentencePiece's escaped space
# A raw space in a piece never matches (the text's spaces are escaped first), in either.
SPACES = {SPACE, " "}
WHITESPACE = SPACES | {"\t", "\n", "\r", "\x0b", "\x0c"}
# SentencePiece's user-defined bonus is 0.1 per byte after the first (GetUserDefinedScore).
# 0.1 on a 2**-20 grid: every bonus up to a 32-space run (95 bytes) is then exact in float32,
# so the splits of a longer run tie exactly in llama.cpp's float64 sums, as they do in exact
# arithmetic, and it takes the first such split. (SentencePiece's own float32 bonuses tie
# less often: 68 of the 168 standard-library files came out identical with them, 82 with
# these; bench/gguf.py.)
TENTH = round(0.1 * 2**20) / 2**20
PAD_SCORE = -10000.0  # rows past the vocabulary: never chosen (unknown scores about -31)


class VocabError(ValueError):
    """A vocabulary llama.cpp's Unigram tokenizer cannot reproduce; names the file and why."""


@dataclass
class GGUFVocab:
    """What the GGUF's tokenizer.ggml.* keys hold."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    charsmap: bytes  # tokenizer.ggml.precompiled_charsmap
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    unk_id: int
    eos_id: int | None
    pad_id: int | None


def gguf_vocab(model_file: Path, rows: int) -> GGUFVocab:
    """Read spiece.model and translate it for a model whose embedding has `rows` rows.

    Rows beyond the vocabulary (a vocabulary smaller than its padded embedding) become
    unused placeholder tokens, as llama.cpp's converter writes them; a vocabulary larger
    than the embedding is refused.
    """
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except DecodeError as err:
        raise VocabError(f"{model_file}: not a SentencePiece model ({err})") from err
    _check_supported(model_file, proto)
    pieces = list(proto.pieces)
    if len(pieces) > rows:
        raise VocabError(
            f"{model_file}: {len(pieces)} pieces, but the model's embedding has only {rows} rows"
        )
    tokens, scores, types = [], [], []
    for piece in pieces:
        token_type, score = _translate(piece)
        tokens.append(piece.piece.encode())
        scores.append(score)
        types.append(token_type)
    for i in range(len(pieces), rows):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(PAD_SCORE)
        types.append(TokenType.UNUSED)
    spec = proto.normalizer_spec
    protected = _protected_characters(model_file, pieces)
    return GGUFVocab(
        tokens=tokens,
        scores=scores,
        types=types,
        charsmap=_unmap(model_file, spec.precompiled_charsmap, protected),
        add_space_prefix=spec.add_dummy_prefix,
        remove_extra_whitespaces=spec.remove_extra_whitespaces,
        unk_id=proto.trainer_spec.unk_id,
        eos_id=_special_id(pieces, proto.trainer_spec.eos_id),
        pad_id=_special_id(pieces, proto.trainer_spec.pad_id),
    )


def _check_supported(model_file: Path, proto: sp_pb2.ModelProto) -> None:
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    refusals = {
        "trainer_spec.model_type": (trainer.model_type, UNIGRAM, "llama.cpp reads Unigram"),
        "trainer_spec.byte_fallback": (
            trainer.byte_fallback,
            False,
            "llama.cpp's Unigram has no byte fallback",
        ),
        "trainer_spec.treat_whitespace_as_suffix": (
            trainer.treat_whitespace_as_suffix,
            False,
            "no GGUF key says so",
        ),
        "normalizer_spec.escape_whitespaces": (
            normalizer.escape_whitespaces,
            True,
            "llama.cpp's Unigram always escapes spaces",
        ),
    }
    for key, (value, wanted, why) in refusals.items():
        if value != wanted:
            raise VocabError(f"{model_file}: {key} is {value!r}, cannot export it ({why})")
    if not 0 <= trainer.unk_id < len(proto.pieces):
        raise VocabError(f"{model_file}: trainer_spec.unk_id {trainer.unk_id} is not a piece")


def _translate(piece: Piece) -> tuple[int, float]:
    """(llama.cpp token type, score) of one piece (see the module docstring)."""
    if piece.type == Piece.USER_DEFINED:
        bonus = TENTH * (len(piece.piece.encode()) - 1)
        if set(piece.piece) <= WHITESPACE:
            return TokenType.NORMAL, bonus
        return TokenType.USER_DEFINED, bonus
    if piece.type == Piece.UNUSED:  # SentencePiece never matches them; llama.cpp would
        return TokenType.UNUSED, PAD_SCORE
    types = {
        Piece.NORMAL: TokenType.NORMAL,
        Piece.UNKNOWN: TokenType.UNKNOWN,
        Piece.CONTROL: TokenType.CONTROL,
        Piece.BYTE: TokenType.BYTE,
    }
    return types[piece.type], piece.score


def _protected_characters(model_file: Path, pieces: list[Piece]) -> set[str]:
    """Characters SentencePiece keeps unnormalized because they are user-defined pieces.

    A whitespace run made of a character that is not itself a piece (`\\t\\t` without `\\t`)
    would need the normalizer to treat the run and the single character apart; refused.
    """
    runs = [p.piece for p in pieces if p.type == Piece.USER_DEFINED and set(p.piece) <= WHITESPACE]
    protected = {run for run in runs if len(run) == 1} - SPACES
    for run in runs:
        if not set(run) <= protected | SPACES:
            raise VocabError(
                f"{model_file}: user-defined piece {run!r} is a whitespace run without each of "
                "its characters being a piece too; llama.cpp's normalizer cannot reproduce it"
            )
    return protected


def _unmap(model_file: Path, charsmap: bytes, characters: set[str]) -> bytes:
    """The precompiled charsmap with the entries for these one-byte characters removed.

    Layout (SentencePiece's normalizer, read the same way by llama.cpp): a uint32 byte size,
    a Darts-clone double array of uint32 units, then NUL-terminated replacement strings. A
    unit holds label (bits 0-7), has-leaf (bit 8) and an offset (bits 10-30, shifted by 8
    when bit 9 is set); the child of node i labelled c sits at i ^ offset(i) ^ c. A key is
    removed by zeroing the unit of its one-byte path from the root: the label check then
    fails, and label 0 is never looked up (llama.cpp stops at a NUL byte). Keys longer than
    one byte starting with such a character would go too; refused if there are any.
    """
    if not charsmap or not characters:
        return charsmap
    (size,) = struct.unpack_from("<I", charsmap)
    units = list(struct.unpack_from(f"<{size // 4}I", charsmap, 4))

    def offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def child(node: int, label: int) -> int | None:
        index = node ^ offset(units[node]) ^ label
        if index < len(units) and units[index] & ((1 << 31) | 0xFF) == label:
            return index
        return None

    for char in sorted(characters):
        label = ord(char)
        node = child(0, label) if label < 0x80 else None
        if node is None:
            continue  # the charsmap leaves it alone already
        if any(child(node, c) is not None for c in range(1, 256)):
            raise VocabError(
                f"{model_file}: the normalizer maps sequences starting with {char!r}; "
                "cannot keep that character unnormalized for llama.cpp"
            )
        units[node] = 0
    return charsmap[:4] + struct.pack(f"<{len(units)}I", *units) + charsmap[4 + size :]


def _special_id(pieces: list[Piece], index: int) -> int | None:
    return index if 0 <= index < len(pieces) else None
