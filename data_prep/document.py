"""The unit every source produces and the tokenizer consumes, and the record of skipped inputs."""

from __future__ import annotations

from collections import Counter
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


class Skipped(Counter):
    """How many inputs were left out for each reason (a Counter), and `names`: which ones.

    Counts alone cannot tell a user which file to fix, so every skip is recorded with `add`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, list[str]] = {}

    def add(self, reason: str, name: str) -> None:
        self[reason] += 1
        self.names.setdefault(reason, []).append(name)
