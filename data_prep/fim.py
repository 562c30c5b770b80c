"""Fill-in-the-middle (FIM): code laid out so that a left-to-right model learns to infill.

As in Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle"),
a document chosen for FIM is cut at two random character positions into prefix P, middle
M and suffix S, and trained as one of (the token order of Megatron-LM's and bigcode's FIM)

    PSM  <pre> P <suf> S <mid> M <eos>
    SPM  <pre> <suf> S <mid> P M <eos>

P, M and S are encoded apart, so a cut may fall inside what would be one token. At
inference the prompt is the same layout without M and EOS (`fim_prompt`): the model
writes the middle and ends it with EOS. The whole FIM document carries loss, sentinels
and EOS included, as in the paper (whose finding is that this keeps left-to-right ability).

Sentinels: replit-code-v1-3b's vocabulary has no FIM tokens, so three of its 100 unused
user-defined pieces serve: `<extra_id_0>` (id 47) prefix, `<extra_id_1>` (48) suffix,
`<extra_id_2>` (49) middle. SentencePiece would turn their literal text in a source file
into those ids too; with FIM on, such text is encoded as text (`tokens.encode_texts`), so
a FIM document holds exactly one of each sentinel and any other document none.

Which documents: code files only. An instruction example keeps its prompt/response
layout: its loss falls on the response alone, and the prompt is not text the model
should learn to write, in any order.

Long documents are cut first, at token boundaries, into chunks of at most
`seq_len - OVERHEAD` tokens, and each chunk is a document of its own (chosen for FIM or
not on its own), so a FIM document fits in one row with its sentinels and EOS. Encoding
P, M and S apart costs a few tokens more than the chunk (up to 9 measured on
transformers' model code); `SLACK` leaves room for that, and a layout that still does
not fit is kept left to right. A chunk left to right is its tokens, with EOS only at the
document's end, as without FIM.

Each document draws from its own generator, seeded by `data.seed` and the document's name:
the same inputs give the same rows, and a document's layout does not depend on the others.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import sentencepiece as spm

from data_prep.packing import Piece, chunk
from data_prep.tokens import encode_texts, token_offsets
from model.tokenizer import ReplitTokenizer

SENTINELS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")  # prefix, suffix, middle
SLACK = 16  # tokens kept free in a chunk for encoding P, M and S apart
OVERHEAD = 4 + SLACK  # three sentinels, EOS and the slack
MIN_SEQ_LEN = 32  # below this a chunk leaves too little text to cut in three


@dataclass(frozen=True)
class FimSettings:
    """How FIM data was made; recorded in manifest.json and the model's replit_ft.json."""

    rate: float  # share of code documents (chunks) laid out for FIM
    spm_rate: float  # share of those in SPM order; the rest are PSM
    prefix_id: int
    suffix_id: int
    middle_id: int

    @classmethod
    def for_tokenizer(cls, tokenizer: ReplitTokenizer, rate: float, spm_rate: float) -> FimSettings:
        """The settings with the tokenizer's sentinel ids, which must be user-defined pieces."""
        sp = tokenizer.sp_model
        ids = []
        for piece in SENTINELS:
            i = sp.piece_to_id(piece)
            if sp.id_to_piece(i) != piece or sp.encode(piece) != [i]:
                raise ValueError(
                    f"tokenizer {tokenizer.name_or_path} has no user-defined piece {piece}: "
                    f"fill-in-the-middle uses {', '.join(SENTINELS)} as sentinels "
                    f"(replit-code-v1-3b's vocabulary has them as ids 47-49)"
                )
            ids.append(i)
        return cls(rate, spm_rate, *ids)

    @classmethod
    def from_dict(cls, values: Any, where: str) -> FimSettings:
        """Read a recorded `fim` block, naming `where` and the key when it is malformed."""
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict) or sorted(values) != sorted(keys):
            raise ValueError(f"{where}: expected an object with keys {', '.join(keys)}")
        for key in keys:
            value = values[key]
            is_id = key.endswith("_id")
            ok = isinstance(value, int) if is_id else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not (value >= 0 if is_id else 0 <= value <= 1):
                want = "a token id (integer >= 0)" if is_id else "a number in [0, 1]"
                raise ValueError(f"{where}.{key}: expected {want}, got {value!r}")
        settings = cls(**values)
        if len(settings.sentinel_ids) != 3:
            raise ValueError(f"{where}: the three sentinel ids must differ")
        return settings

    @property
    def sentinel_ids(self) -> frozenset[int]:
        return frozenset((self.prefix_id, self.suffix_id, self.middle_id))

    @property
    def spm_at_inference(self) -> bool:
        """Prompt in the order trained more often (PSM on a tie)."""
        return self.spm_rate > 0.5


def layout(
    prefix: list[int], suffix: list[int], middle: list[int], *, spm: bool, fim: FimSettings
) -> list[int]:
    """The FIM token order of the module docstring, without EOS."""
    if spm:
        return [fim.prefix_id, fim.suffix_id, *suffix, fim.middle_id, *prefix, *middle]
    return [fim.prefix_id, *prefix, fim.suffix_id, *suffix, fim.middle_id, *middle]


def fim_prompt(tokenizer: ReplitTokenizer, prefix: str, suffix: str, fim: FimSettings) -> list[int]:
    """The ids to generate a middle from: the training layout up to the middle sentinel."""
    p, s = encode_texts(tokenizer.sp_model, [prefix, suffix], fim.sentinel_ids)
    return layout(p, s, [], spm=fim.spm_at_inference, fim=fim)


def document_rng(seed: int, name: str) -> random.Random:
    """The generator of one document's FIM choices (str seeds hash the same in every process)."""
    return random.Random(f"{seed}\0{name}")


def fim_pieces(
    tokenizer: ReplitTokenizer,
    text: str,
    ids: np.ndarray,
    fim: FimSettings,
    seq_len: int,
    rng: random.Random,
) -> list[Piece]:
    """One code document's pieces, in order: chunks laid out for FIM or left to right.

    `ids` is the document encoded with the sentinels reserved and EOS last, as
    `encode_documents(..., reserved=fim.sentinel_ids)` yields it.
    """
    chunks = _chunks(tokenizer, text, ids[:-1], seq_len - OVERHEAD, fim.sentinel_ids)
    spm_order: dict[int, bool] = {}  # the chunks chosen for FIM, and their order
    texts: list[str] = []  # their prefix, middle and suffix, in turn
    for k, (part, _) in enumerate(chunks):
        if rng.random() < fim.rate:
            i, j = sorted(rng.randint(0, len(part)) for _ in range(2))
            spm_order[k] = rng.random() < fim.spm_rate
            texts += [part[:i], part[i:j], part[j:]]
    encoded = iter(encode_texts(tokenizer.sp_model, texts, fim.sentinel_ids))
    pieces: list[Piece] = []
    for k, (_, part_ids) in enumerate(chunks):
        laid_out = None
        if k in spm_order:
            p, m, s = next(encoded), next(encoded), next(encoded)
            fim_ids = [*layout(p, s, m, spm=spm_order[k], fim=fim), tokenizer.eos_token_id]
            if len(fim_ids) <= seq_len:  # else left to right (see the module docstring)
                laid_out = np.asarray(fim_ids, dtype=np.int32)
        if laid_out is None:
            end = [tokenizer.eos_token_id] if k == len(chunks) - 1 else []
            laid_out = np.concatenate([part_ids, np.asarray(end, dtype=np.int32)])
        pieces += chunk(laid_out, np.ones(len(laid_out), dtype=bool), seq_len)
    return pieces


def _chunks(
    tokenizer: ReplitTokenizer, text: str, ids: np.ndarray, budget: int, reserved: frozenset[int]
) -> list[tuple[str, np.ndarray]]:
    """`text` and its `ids` cut where every `budget`-th token begins: the texts join back
    to `text`."""
    if len(ids) <= budget:
        return [(text, ids)]
    sp = tokenizer.sp_model
    starts = range(budget, len(ids), budget)
    if sp.decode(ids.tolist()) == text:
        # Decoding is each piece's text, "▁" read as a space: piece lengths give offsets.
        ends = np.cumsum(_piece_lengths(sp)[ids])
        bounds = [0, *(int(ends[t - 1]) for t in starts), len(text)]
        parts = [text[a:b] for a, b in pairwise(bounds)]
        return list(zip(parts, np.split(ids, list(starts)), strict=True))
    # nmt_nfkc changed some text: offsets of the text as given, and the parts encoded again.
    data = text.encode("utf-8")
    begins = [at for _, at in token_offsets(sp, text, reserved)]
    bounds = [0, *(begins[t] for t in starts), len(data)]
    parts = [data[a:b].decode("utf-8") for a, b in pairwise(bounds) if b > a]
    encoded = encode_texts(sp, parts, reserved)
    return [(t, np.asarray(e, dtype=np.int32)) for t, e in zip(parts, encoded, strict=True)]


@functools.lru_cache(maxsize=4)
def _piece_lengths(sp: spm.SentencePieceProcessor) -> np.ndarray:
    return np.array([len(sp.id_to_piece(i)) for i in range(sp.get_piece_size())])
