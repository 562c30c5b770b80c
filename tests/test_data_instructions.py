"""Instruction sets in every file type and format to Documents, and the errors bad input gives."""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from data_prep.document import Document
from data_prep.instructions import DEFAULT_TEMPLATE, Template, load_instructions

ALPACA = [
    {"instruction": "Reverse a list.", "input": " ", "output": "xs[::-1]"},
    {"instruction": "Add {a} and b.", "input": "a=1, b=2", "output": "a + b"},
]
ALPACA_RENDERED = [
    ("### Instruction:\nReverse a list.\n\n### Response:\n", "xs[::-1]"),
    (
        "### Instruction:\nAdd {a} and b.\n\n### Input:\na=1, b=2\n\n### Response:\n",
        "a + b",
    ),
]
PROMPT_COMPLETION = [{"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}]
PROMPT_COMPLETION_RENDERED = [("def add(a, b):\n", "    return a + b\n")]
TEXT = [{"text": "print('hi')\n"}]
TEXT_RENDERED = [("", "print('hi')\n")]
MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "Answer in Python."},
            {"role": "user", "content": "Sum a list."},
            {"role": "assistant", "content": "sum(xs)"},
        ]
    }
]
MESSAGES_RENDERED = [
    ("### System:\nAnswer in Python.\n\n### User:\nSum a list.\n\n### Assistant:\n", "sum(xs)")
]
CASES = {
    "alpaca": (ALPACA, ALPACA_RENDERED),
    "prompt_completion": (PROMPT_COMPLETION, PROMPT_COMPLETION_RENDERED),
    "text": (TEXT, TEXT_RENDERED),
    "messages": (MESSAGES, MESSAGES_RENDERED),
}


def write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


def names(path: Path, count: int) -> list[str]:
    if path.suffix == ".jsonl":
        return [f"{path}:{line}" for line in range(1, count + 1)]
    return [f"{path}:#{index}" for index in range(count)]


# A CSV cell cannot hold a list of chat turns.
FILE_FORMATS = [
    (suffix, fmt)
    for suffix in (".jsonl", ".json", ".csv", ".parquet")
    for fmt in CASES
    if (suffix, fmt) != (".csv", "messages")
]


@pytest.mark.parametrize("suffix, fmt", FILE_FORMATS)
@pytest.mark.parametrize("named", [False, True])
def test_each_format_from_each_file_type(tmp_path, suffix, fmt, named):
    records, rendered = CASES[fmt]
    path = write(tmp_path / f"set{suffix}", records)
    result = load_instructions(path, format=fmt if named else "auto")
    assert result.format == fmt
    assert result.documents == [
        Document(name, completion, prompt)
        for name, (prompt, completion) in zip(names(path, len(records)), rendered, strict=True)
    ]
    assert result.skipped == Counter()


def test_detection_prefers_messages_then_alpaca_then_prompt_completion(tmp_path):
    record = {"instruction": "I", "output": "O", "prompt": "P", "completion": "C", "text": "T"}
    path = write(tmp_path / "set.jsonl", [record])
    assert load_instructions(path).format == "alpaca"
    assert load_instructions(path, format="text").documents == [Document(f"{path}:1", "T")]
    pc = load_instructions(path, format="prompt_completion")
    assert pc.documents == [Document(f"{path}:1", "C", "P")]

    path = write(tmp_path / "both.jsonl", [{**MESSAGES[0], **record}])
    assert load_instructions(path).format == "messages"


def test_undetectable_record_lists_its_fields_and_what_formats_need(tmp_path):
    path = write(tmp_path / "set.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as err:
        load_instructions(path)
    message = str(err.value)
    assert f"{path}:1" in message and "question, answer" in message
    assert "alpaca needs instruction, output" in message
    assert "messages needs messages" in message and "text needs text" in message


def test_unknown_format_name_is_an_error(tmp_path):
    path = write(tmp_path / "set.jsonl", TEXT)
    with pytest.raises(ValueError, match="unknown format 'chat'.*alpaca"):
        load_instructions(path, format="chat")


def test_multi_turn_chat_trains_on_the_last_assistant_turn_only(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Square 3?"},
        {"role": "assistant", "content": "9"},
        {"role": "user", "content": "Now in code."},
        {"role": "assistant", "content": "3 ** 2"},
        {"role": "user", "content": "Thanks"},
    ]
    path = write(tmp_path / "chat.jsonl", [{"messages": turns}])
    [doc] = load_instructions(path).documents
    assert doc.prompt == (
        "### System:\nBe brief.\n\n"
        "### User:\nSquare 3?\n\n"
        "### Assistant:\n9\n\n"
        "### User:\nNow in code.\n\n"
        "### Assistant:\n"
    )
    assert doc.completion == "3 ** 2"


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "tool"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], r"messages\[0\]"),
        ("hello", "not a list"),
    ],
)
def test_bad_messages_are_errors_or_skipped(tmp_path, messages, problem):
    path = write(tmp_path / "chat.jsonl", [{"messages": messages}, MESSAGES[0]])
    with pytest.raises(ValueError, match=f"{path}:1: .*{problem}"):
        load_instructions(path)
    result = load_instructions(path, skip_bad=True)
    assert [doc.name for doc in result.documents] == [f"{path}:2"]
    assert result.skipped == Counter({"bad messages": 1})


def test_custom_template_from_a_dict_renders_exactly(tmp_path):
    template = Template.from_dict(
        {
            "prompt": "<task>{instruction}</task>\n",
            "response_prefix": "<answer>",
            "user": "U: ",
            "assistant": "A: ",
            "separator": "\n",
        }
    )
    assert template.prompt_with_input == DEFAULT_TEMPLATE.prompt_with_input
    alpaca = write(tmp_path / "alpaca.jsonl", ALPACA)
    docs = load_instructions(alpaca, template=template).documents
    assert [doc.prompt for doc in docs] == [
        "<task>Reverse a list.</task>\n<answer>",
        "### Instruction:\nAdd {a} and b.\n\n### Input:\na=1, b=2\n\n<answer>",
    ]
    chat = write(tmp_path / "chat.jsonl", [{"messages": MESSAGES[0]["messages"][1:]}])
    [doc] = load_instructions(chat, template=template).documents
    assert (doc.prompt, doc.completion) == ("U: Sum a list.\nA: ", "sum(xs)")


def test_unknown_template_key_is_named():
    with pytest.raises(ValueError, match=r"unknown template keys \['respone_prefix'\]"):
        Template.from_dict({"prompt": "{instruction}", "respone_prefix": "A:"})


def test_unknown_template_placeholder_is_named():
    with pytest.raises(ValueError, match=r"prompt uses unknown placeholders \['instrution'\]"):
        Template(prompt="{instrution}\n")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n\n" + '{"text": "x",\n' + json.dumps(TEXT[0]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: malformed JSON: .* column"):
        load_instructions(path)
    result = load_instructions(path, skip_bad=True)
    assert [doc.name for doc in result.documents] == [f"{path}:1", f"{path}:4"]
    assert result.skipped == Counter({"malformed json": 1})


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "set.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(ValueError, match=f"{path}:3: malformed JSON"):
        load_instructions(path, skip_bad=True)


def test_json_object_with_one_list_of_records(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"version": 2, "data": TEXT}))
    assert load_instructions(path).documents == [Document(f"{path}:#0", TEXT[0]["text"])]


def test_missing_fields_names_the_record_format_and_fields_it_has(tmp_path):
    path = write(tmp_path / "set.jsonl", [ALPACA[0], {"instruction": "x", "response": "y"}])
    with pytest.raises(ValueError) as err:
        load_instructions(path)
    assert (
        str(err.value) == f"{path}:2: alpaca record is missing output; it has instruction, response"
    )


def test_none_is_missing_and_rows_are_named_by_index(tmp_path):
    records = [ALPACA[0], {"instruction": "x", "input": "y", "output": None}]
    path = write(tmp_path / "set.parquet", records)
    with pytest.raises(ValueError) as err:
        load_instructions(path)
    assert (
        str(err.value) == f"{path}:#1: alpaca record is missing output; it has instruction, input"
    )


def test_skip_bad_counts_each_reason(tmp_path):
    path = tmp_path / "set.jsonl"
    lines = [
        json.dumps(ALPACA[0]),
        "not json",
        json.dumps({"instruction": "x"}),
        "[1, 2]",
        json.dumps({"instruction": "x", "output": " \n"}),
        json.dumps(ALPACA[1]),
    ]
    path.write_text("\n".join(lines))
    result = load_instructions(path, skip_bad=True)
    assert [doc.name for doc in result.documents] == [f"{path}:1", f"{path}:6"]
    assert result.skipped == Counter(
        {"malformed json": 1, "missing fields": 1, "not an object": 1, "empty response": 1}
    )


def test_empty_response_is_skipped_without_skip_bad(tmp_path):
    path = write(tmp_path / "set.csv", [ALPACA[0], {"instruction": "x", "input": "", "output": ""}])
    result = load_instructions(path)
    assert [doc.name for doc in result.documents] == [f"{path}:#0"]
    assert result.skipped == Counter({"empty response": 1})


def test_non_string_values_are_converted(tmp_path):
    path = write(tmp_path / "set.jsonl", [{"instruction": "Double it.", "input": 21, "output": 42}])
    [doc] = load_instructions(path).documents
    assert doc.prompt == "### Instruction:\nDouble it.\n\n### Input:\n21\n\n### Response:\n"
    assert doc.completion == "42"


def test_empty_set(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_instructions(path)
    assert load_instructions(path, format="text").documents == []


def test_missing_file_and_unsupported_type(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_instructions(str(missing))
    other = tmp_path / "set.txt"
    other.write_text("hi")
    with pytest.raises(ValueError, match=r"set.txt: unsupported file type; supported: \.jsonl"):
        load_instructions(other)


def test_hub_dataset_name_and_split(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return TEXT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_instructions("org/set:test").documents == [
        Document("org/set:test:#0", TEXT[0]["text"])
    ]
    assert load_instructions("org/set").documents[0].name == "org/set:train:#0"
    assert calls == [("org/set", "test"), ("org/set", "train")]


def test_hub_failure_says_the_path_is_not_local(tmp_path, monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(FileNotFoundError, match="org/set: no such local file.*hub unreachable"):
        load_instructions("org/set")


LATIN1 = "caf\xe9".encode("latin-1")  # not UTF-8: 0xe9 starts a sequence the next byte breaks


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_file_names_file_and_line_and_skip_bad_skips_the_record(tmp_path, suffix):
    path = write(tmp_path / f"set{suffix}", [*ALPACA, {"instruction": "X", "output": "Y"}])
    data = path.read_bytes()
    at = data.index(b"Y")
    path.write_bytes(data[:at] + LATIN1 + data[at + 1 :])  # in the third record's output
    line = data[:at].count(b"\n") + 1
    column = at - data.rfind(b"\n", 0, at) + 3  # after "caf"
    with pytest.raises(ValueError) as err:
        load_instructions(path)
    assert str(err.value).startswith(f"{path}:{line}: not UTF-8 (byte 0xe9 at column {column})")
    result = load_instructions(path, skip_bad=True)
    assert [doc.name for doc in result.documents] == names(path, 2)
    assert result.skipped.names == {"not utf-8": [names(path, 3)[2]]}


def test_utf8_bom_is_not_part_of_the_first_record(tmp_path):
    for suffix in (".jsonl", ".json", ".csv"):
        path = write(tmp_path / f"set{suffix}", ALPACA)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert [d.completion for d in load_instructions(path).documents] == ["xs[::-1]", "a + b"]


def test_malformed_csv_names_file_and_line(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text('instruction,output\nA,"a"\nB,b,extra\n\nC,"c\n"\n')
    with pytest.raises(ValueError, match=f"^{path}:#1: line 3: 3 cells, the header has 2$"):
        load_instructions(path)
    result = load_instructions(path, skip_bad=True)
    assert [(d.name, d.completion) for d in result.documents] == [
        (f"{path}:#0", "a"),
        (f"{path}:#2", "c\n"),
    ]
    assert result.skipped.names == {"malformed csv": [f"{path}:#1"]}

    path.write_text('instruction,output\nA,"a\nB,b\n')
    with pytest.raises(ValueError, match=f"^{path}:3: malformed CSV: unexpected end of data"):
        load_instructions(path, skip_bad=True)
    path.write_text("output,output\nA,a\n")
    with pytest.raises(ValueError, match=f"^{path}:1: the header names a column twice"):
        load_instructions(path)


def test_unreadable_parquet_and_special_files_name_the_file(tmp_path):
    parquet = tmp_path / "set.parquet"
    parquet.write_bytes(b"PAR1 but not parquet")
    with pytest.raises(ValueError, match=f"^{parquet}: not a readable Parquet file"):
        load_instructions(parquet)
    fifo = tmp_path / "set.jsonl"
    os.mkfifo(fifo)  # reading it would block for ever
    with pytest.raises(ValueError, match=f"^{fifo}: not a regular file"):
        load_instructions(fifo)


def test_skipped_records_are_named_and_deep_nesting_is_malformed(tmp_path):
    path = tmp_path / "set.jsonl"
    lines = [json.dumps(ALPACA[0]), "{", json.dumps({"text": "x"}), "[]", "[" * 100_000]
    path.write_text("\n".join(lines))
    result = load_instructions(path, format="alpaca", skip_bad=True)
    assert result.skipped.names == {
        "malformed json": [f"{path}:2", f"{path}:5"],
        "missing fields": [f"{path}:3"],
        "not an object": [f"{path}:4"],
    }
