"""The unit every source produces and the tokenizer consumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One training document: `prompt` tokens get no loss, `completion` tokens do.

    A source file is all completion; an instruction record is its rendered prompt
    and its response. `name` says where it came from (a relative path, or
    `file:line`), for reports and the train/validation split.
    """

    name: str
    completion: str
    prompt: str = ""
