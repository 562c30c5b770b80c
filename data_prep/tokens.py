"""Documents to token ids with the model's tokenizer: prompt and completion, then EOS."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from itertools import pairwise

import numpy as np
import sentencepiece as spm
from tqdm.auto import tqdm

from data_prep.document import Document
from model.tokenizer import ReplitTokenizer

BATCH_CHARS = 1 << 20


def encode_documents(
    tokenizer: ReplitTokenizer,
    documents: Sequence[Document],
    *,
    progress: bool = True,
    reserved: Collection[int] = (),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, per document in order, its ids and which of them train (False on the prompt).

    EOS (the tokenizer's `eos_token_id`, 1 for replit) is appended as an id, never as
    text, and trains, so the model learns to stop. Prompt and completion are encoded
    separately, so the loss boundary falls exactly between them. Ids in `reserved` never
    come from the text (see `encode_texts`).
    """
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    total = sum(len(d.prompt) + len(d.completion) for d in documents)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for batch in _batches(documents):
            texts = [d.prompt for d in batch] + [d.completion for d in batch]
            # SentencePiece itself, a batch per call on all cores: the transformers wrapper
            # gives the same ids but adds per-text Python work that dominates on code.
            ids = encode_texts(tokenizer.sp_model, texts, reserved)
            for k in range(len(batch)):
                prompt = np.asarray(ids[k], dtype=np.int32)
                completion = np.asarray(ids[len(batch) + k], dtype=np.int32)
                tokens = np.concatenate([prompt, completion, eos])
                trained = np.arange(len(tokens)) >= len(prompt)
                yield tokens, trained
            bar.update(sum(len(d.prompt) + len(d.completion) for d in batch))


def encode_texts(
    sp: spm.SentencePieceProcessor, texts: list[str], reserved: Collection[int] = ()
) -> list[list[int]]:
    """SentencePiece's ids of each text, in one batched call, where no id in `reserved` comes
    from the text itself (see `token_offsets`)."""
    batch = sp.encode(texts)
    if reserved:
        reserved = frozenset(reserved)
        batch = [
            ids if reserved.isdisjoint(ids) else [i for i, _ in token_offsets(sp, text, reserved)]
            for text, ids in zip(texts, batch, strict=True)
        ]
    return batch


def token_offsets(
    sp: spm.SentencePieceProcessor, text: str, reserved: Collection[int] = ()
) -> list[tuple[int, int]]:
    """(id, UTF-8 byte offset in `text` where it begins) of each token, no id in `reserved`
    coming from the text itself.

    `<extra_id_N>` pieces are user-defined: SentencePiece turns their literal text (or text
    nmt_nfkc normalizes to it, such as full-width brackets) into their ids. Where it did so
    for a reserved id, the text is cut after that match's first character and the parts
    are encoded apart, so the text stays text and decodes to the same characters.
    """
    data = text.encode("utf-8")
    pieces = sp.encode(text, return_type="proto").pieces  # offsets: the text as given
    cuts = [
        p.begin + len(data[p.begin : p.end].decode("utf-8")[0].encode("utf-8"))
        for p in pieces
        if p.id in reserved
    ]
    if not cuts:
        return [(p.id, p.begin) for p in pieces]
    tokens = []
    for a, b in pairwise([0, *cuts, len(data)]):
        # Each part is checked again rather than assumed clean: it is shorter, so this ends.
        tokens += [(i, a + at) for i, at in token_offsets(sp, data[a:b].decode("utf-8"), reserved)]
    return tokens


def _batches(documents: Sequence[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc.prompt) + len(doc.completion)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
