"""Documents to token ids with the model's tokenizer: prompt and completion, then EOS."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from data_prep.document import Document
from model.tokenizer import ReplitTokenizer

BATCH_CHARS = 1 << 20


def encode_documents(
    tokenizer: ReplitTokenizer, documents: Sequence[Document], *, progress: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, per document in order, its ids and which of them train (False on the prompt).

    EOS (the tokenizer's `eos_token_id`, 1 for replit) is appended as an id, never as
    text, and trains, so the model learns to stop. Prompt and completion are encoded
    separately, so the loss boundary falls exactly between them.
    """
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    total = sum(len(d.prompt) + len(d.completion) for d in documents)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for batch in _batches(documents):
            texts = [d.prompt for d in batch] + [d.completion for d in batch]
            # SentencePiece itself, a batch per call on all cores: the transformers wrapper
            # gives the same ids but adds per-text Python work that dominates on code.
            ids = tokenizer.sp_model.encode(texts)
            for k in range(len(batch)):
                prompt = np.asarray(ids[k], dtype=np.int32)
                completion = np.asarray(ids[len(batch) + k], dtype=np.int32)
                tokens = np.concatenate([prompt, completion, eos])
                trained = np.arange(len(tokens)) >= len(prompt)
                yield tokens, trained
            bar.update(sum(len(d.prompt) + len(d.completion) for d in batch))


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
