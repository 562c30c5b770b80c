"""Instruction sets to Documents: the rendered prompt gets no loss, the response does.

A set is a local `.jsonl`, `.json`, `.csv` or `.parquet` file, or a Hugging Face dataset,
whose records are in one of four formats:

- `messages`: `{"messages": [{"role": ..., "content": ...}, ...]}`, roles system, user,
  assistant. Only the last assistant turn is the completion: `Document` has one prompt and
  one completion, so earlier assistant turns are context without loss, and turns after the
  last assistant turn are dropped.
- `alpaca`: `instruction`, optional `input`, `output`.
- `prompt_completion`: `prompt` and `completion`, used verbatim.
- `text`: `text`, all completion.

Prompts are rendered by a `Template`; the completion is the response as is (the tokenizer
stage appends EOS).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from string import Formatter
from typing import Any

from data_prep.document import Document, Skipped

# The fields each format needs, in auto-detection order.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# The placeholders a template field may use; the other fields are plain text.
_PLACEHOLDERS = {"prompt": {"instruction"}, "prompt_with_input": {"instruction", "input"}}
# What a non-UTF-8 byte becomes when a file is decoded with errors="surrogateescape", and what a
# JSON "\udc80" escape gives: text that cannot be encoded, so never training text.
_SURROGATE = re.compile("[\ud800-\udfff]")
_REENCODE = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or skip such records (--skip-bad)"


@dataclass(frozen=True)
class Template:
    """How a record becomes prompt text.

    Alpaca: `prompt` (or `prompt_with_input` when `input` is not blank), a `str.format`
    string with `{instruction}` and `{input}`, then `response_prefix`. Chat: each turn
    before the last assistant turn is its role's prefix, its content and `separator`; then
    the `assistant` prefix. prompt_completion and text records are not templated.
    """

    prompt: str = "### Instruction:\n{instruction}\n\n"
    prompt_with_input: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    response_prefix: str = "### Response:\n"
    system: str = "### System:\n"
    user: str = "### User:\n"
    assistant: str = "### Assistant:\n"
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise TypeError(f"template {f.name} must be a string, got {value!r}")
            if f.name in _PLACEHOLDERS:
                used = {name for _, name, _, _ in Formatter().parse(value) if name is not None}
                if unknown := sorted(used - _PLACEHOLDERS[f.name]):
                    allowed = ", ".join(sorted(_PLACEHOLDERS[f.name]))
                    raise ValueError(
                        f"template {f.name} uses unknown placeholders {unknown}; "
                        f"it may use {allowed} (write literal braces as {{{{ }}}})"
                    )

    @classmethod
    def from_dict(cls, values: Mapping[str, str]) -> Template:
        """A template from a recipe's fields; the fields it leaves out keep their defaults."""
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(values) - set(known)):
            raise ValueError(f"unknown template keys {unknown}; known keys: {', '.join(known)}")
        return cls(**values)


DEFAULT_TEMPLATE = Template()


@dataclass
class InstructionSet:
    """The documents of a set, its format (detected or named) and the records skipped, by reason
    and name."""

    documents: list[Document]
    format: str
    skipped: Skipped = field(default_factory=Skipped)


class _BadRecord(ValueError):
    """A record that `skip_bad` skips; `reason` is its key in `InstructionSet.skipped`."""

    def __init__(self, where: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = reason


def load_instructions(
    source: str | Path,
    *,
    format: str = "auto",
    template: Template | None = None,
    skip_bad: bool = False,
) -> InstructionSet:
    """Read an instruction set into Documents, in file order.

    `source` is a local file, or else a Hugging Face dataset `name` or `name:split` (split
    train by default). `format` is one of `FORMATS` or `auto`, which takes the first format
    whose fields the first record has (messages, alpaca, prompt_completion, text). A chat's
    completion is its last assistant turn; earlier turns are prompt (see the module docstring).

    Each Document is named after its record: `file:line` (1-based) for JSON lines,
    `file:#index` (0-based) for JSON, CSV and Parquet, `name:split:#index` for the hub.
    A malformed JSON line or CSV row, text that is not UTF-8, or a record without its format's
    fields is an error naming the file and line (or record); with `skip_bad` the record is
    skipped and counted instead (a `.json` file that does not parse is always an error). Records
    with a blank response are always skipped and counted.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected auto, {', '.join(FORMATS)}")
    template = template or DEFAULT_TEMPLATE
    skipped = Skipped()

    def bad(err: _BadRecord) -> None:
        if not skip_bad:
            raise err
        skipped.add(err.reason, err.where)

    documents = []
    for where, record in _records(source, skip_bad, bad):
        try:
            if not isinstance(record, dict):
                raise _BadRecord(
                    where, "not an object", f"expected an object, got {type(record).__name__}"
                )
            if format == "auto":
                format = _detect(where, record)
            prompt, completion = _render(where, record, format, template)
            if _SURROGATE.search(prompt) or _SURROGATE.search(completion):
                raise _BadRecord(where, "not utf-8", f"text that is not UTF-8; {_REENCODE}")
        except _BadRecord as err:
            bad(err)
            continue
        if completion.strip():
            documents.append(Document(where, completion, prompt))
        else:
            skipped.add("empty response", where)
    if format == "auto":
        raise ValueError(f"{source}: no records to detect the format from")
    return InstructionSet(documents, format, skipped)


def _records(
    source: str | Path, skip_bad: bool, bad: Callable[[_BadRecord], None]
) -> Iterator[tuple[str, Any]]:
    """(name, record) pairs of a local file or, when there is no such path, a hub dataset."""
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.exists():
        if isinstance(source, Path) or suffix in SUFFIXES:
            raise FileNotFoundError(f"{source}: no such file")
        return _hub_records(str(source))
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type; supported: {', '.join(SUFFIXES)}")
    if not path.is_file():  # a FIFO or device would block the read
        raise ValueError(f"{path}: not a regular file")
    if suffix == ".jsonl":
        return _jsonl_records(path, bad)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # slow to import: only for the files that need it

        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable Parquet file: {err}") from None
        return ((f"{path}:#{i}", row) for i, row in enumerate(rows))
    # Undecodable bytes become lone surrogates with skip_bad, and their records are skipped.
    text = _decode(path, path.read_bytes(), skip_bad)
    if suffix == ".csv":
        return _csv_records(path, text, bad)
    return ((f"{path}:#{i}", row) for i, row in enumerate(_json_rows(path, text)))


def _decode(path: Path, data: bytes, skip_bad: bool) -> str:
    """UTF-8 text (a BOM dropped), or an error naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if skip_bad:
            return data.decode("utf-8-sig", errors="surrogateescape")
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            + _REENCODE
        ) from None


def _jsonl_records(path: Path, bad: Callable[[_BadRecord], None]) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                message = f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                bad(_BadRecord(where, "not utf-8", message + _REENCODE))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"malformed JSON: {err.msg} at column {err.colno}"
                bad(_BadRecord(where, "malformed json", message))
                continue
            except RecursionError:
                bad(_BadRecord(where, "malformed json", "malformed JSON: nested too deeply"))
                continue
            yield where, record


def _json_rows(path: Path, text: str) -> list[Any]:
    """A list of records, or the one list-valued entry of an object such as {"data": [...]}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: malformed JSON: nested too deeply") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of records or an object with one list-valued key"
        )
    return data


def _csv_records(
    path: Path, text: str, bad: Callable[[_BadRecord], None]
) -> list[tuple[str, dict[str, str]]]:
    """Rows as {column: cell}, every cell a string as written ("NA" in a response is text).

    The csv module, not pandas: it keeps undecodable bytes for skip_bad to skip, and says on
    which line a row ends.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    limit = csv.field_size_limit(2**31 - 1)  # the default, 128 KiB, is short for a response
    records = []
    try:
        header = next(reader, [])
        if len(set(header)) < len(header):
            raise ValueError(f"{path}:1: the header names a column twice: {header}")
        rows = (row for row in reader if row)  # blank lines are no rows
        for index, row in enumerate(rows):
            where = f"{path}:#{index}"
            if len(row) != len(header):
                message = f"line {reader.line_num}: {len(row)} cells, the header has {len(header)}"
                bad(_BadRecord(where, "malformed csv", message))
            else:
                records.append((where, dict(zip(header, row, strict=True))))
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
    finally:
        csv.field_size_limit(limit)
    return records


def _hub_records(source: str) -> Iterator[tuple[str, Any]]:
    import datasets  # slow to import; only hub sources need it

    name, _, split = source.partition(":")
    split = split or "train"
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise FileNotFoundError(
            f"{source}: no such local file, and loading it as Hugging Face dataset {name!r} "
            f"(split {split!r}) failed: {type(err).__name__}: {err}"
        ) from err
    for i, row in enumerate(rows):
        yield f"{name}:{split}:#{i}", row


def _present(record: dict) -> str:
    return ", ".join(key for key, value in record.items() if value is not None) or "none"


def _detect(where: str, record: dict) -> str:
    for name, needed in FORMATS.items():
        if all(record.get(key) is not None for key in needed):
            return name
    needs = "; ".join(f"{name} needs {', '.join(needed)}" for name, needed in FORMATS.items())
    raise ValueError(
        f"{where}: cannot detect the format of a record with fields {_present(record)} ({needs})"
    )


def _render(where: str, record: dict, format: str, template: Template) -> tuple[str, str]:
    """The prompt and completion of a record."""
    if missing := [key for key in FORMATS[format] if record.get(key) is None]:
        raise _BadRecord(
            where,
            "missing fields",
            f"{format} record is missing {', '.join(missing)}; it has {_present(record)}",
        )
    if format == "messages":
        return _chat(where, record["messages"], template)
    if format == "alpaca":
        return _alpaca(record, template)
    if format == "prompt_completion":
        return str(record["prompt"]), str(record["completion"])
    return "", str(record["text"])


def _alpaca(record: dict, template: Template) -> tuple[str, str]:
    instruction = str(record["instruction"])
    given = "" if record.get("input") is None else str(record["input"])
    if given.strip():
        prompt = template.prompt_with_input.format(instruction=instruction, input=given)
    else:
        prompt = template.prompt.format(instruction=instruction)
    return prompt + template.response_prefix, str(record["output"])


def _chat(where: str, messages: Any, template: Template) -> tuple[str, str]:
    prefixes = {"system": template.system, "user": template.user, "assistant": template.assistant}
    if not isinstance(messages, list):
        raise _BadRecord(
            where, "bad messages", f"messages is a {type(messages).__name__}, not a list"
        )
    for i, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in prefixes or turn.get("content") is None:
            raise _BadRecord(
                where,
                "bad messages",
                f"messages[{i}] needs a role ({', '.join(prefixes)}) and a content; "
                f"got {str(turn)[:200]}",
            )
    last = max((i for i, turn in enumerate(messages) if turn["role"] == "assistant"), default=None)
    if last is None:
        raise _BadRecord(where, "bad messages", "messages has no assistant turn")
    context = "".join(
        prefixes[turn["role"]] + str(turn["content"]) + template.separator
        for turn in messages[:last]
    )
    return context + template.assistant, str(messages[last]["content"])
