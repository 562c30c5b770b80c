"""Generation: stop sequences and EOS, batches equal prompts one by one, streaming, prompt files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune.cli import main
from finetune.generate import (
    OptionError,
    completion_text,
    finish,
    generate,
    load_for_generation,
    read_prompts,
)
from finetune.merge import merge
from model import load_model, load_tokenizer
from model.random_checkpoint import write_checkpoint

PROMPTS = ["def fib(n):\n", "import os", "class Stack:\n    def __init__(self):"]
GREEDY = {"temperature": 0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_for_generation(tiny_checkpoint)


class ForwardCounter:
    """How many forward passes generation ran: with the KV cache, one per new token."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __enter__(self) -> ForwardCounter:
        self.handle = self.model.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, *args) -> None:
        self.calls += 1


def greedy_ids(model, tokenizer, prompt: str, n: int) -> list[int]:
    """The first `n` greedy tokens after `prompt`, with no stopping at all."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, ids.shape[1] :].tolist()


def test_batched_generation_equals_one_by_one(loaded):
    model, tokenizer = loaded
    alone = [generate(model, tokenizer, [p], **GREEDY)[0] for p in PROMPTS]
    assert generate(model, tokenizer, PROMPTS, **GREEDY) == alone
    assert generate(model, tokenizer, PROMPTS, batch_size=2, **GREEDY) == alone
    assert all(alone)


def test_stops_at_a_stop_sequence_and_cuts_the_text(loaded):
    model, tokenizer = loaded
    ids = greedy_ids(model, tokenizer, PROMPTS[0], 40)
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    at = len(tokenizer.decode(ids[:6], clean_up_tokenization_spaces=False))
    stop = text[at - 2 : at + 2]  # spans two tokens
    steps = next(n for n in range(1, 41) if stop in tokenizer.decode(ids[:n]))
    pieces = []
    settings = {"stop": ["never", stop], "temperature": 0, "max_new_tokens": 40}
    with ForwardCounter(model) as counter:
        got = generate(
            model, tokenizer, PROMPTS[:1], on_text=lambda i, s: pieces.append(s), **settings
        )
    assert got == [text[: text.index(stop)].rstrip()]
    assert counter.calls == steps < 40
    assert "".join(pieces) == got[0] and stop not in "".join(pieces)


def test_stops_at_eos(tiny_checkpoint):
    """EOS's output row becomes a copy of a token X's: where greedy decoding picked X, the tie
    now goes to EOS (argmax takes the lowest index), and nothing before that step changes."""
    model = load_model(tiny_checkpoint)
    tokenizer = load_tokenizer(tiny_checkpoint)
    ids = greedy_ids(model, tokenizer, PROMPTS[1], 20)
    k = next(i for i in range(3, 20) if ids[i] not in ids[:i])
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.eos_token_id] = model.transformer.wte.weight[ids[k]]
    with ForwardCounter(model) as counter:
        got = generate(model, tokenizer, PROMPTS[1:2], temperature=0, max_new_tokens=20)
    assert got == [finish(tokenizer.decode(ids[:k]), [])]
    assert counter.calls == k + 1
    batched = generate(model, tokenizer, PROMPTS, temperature=0, max_new_tokens=20)
    alone = [generate(model, tokenizer, [p], temperature=0, max_new_tokens=20)[0] for p in PROMPTS]
    assert batched == alone
    assert batched[1] == got[0]


def test_streamed_pieces_add_up_to_the_result(loaded):
    model, tokenizer = loaded
    pieces: list[tuple[int, str]] = []
    got = generate(
        model, tokenizer, PROMPTS[:1], on_text=lambda i, s: pieces.append((i, s)), **GREEDY
    )
    assert len(pieces) > 1 and {i for i, _ in pieces} == {0}
    assert "".join(s for _, s in pieces) == got[0]
    pieces.clear()
    got = generate(model, tokenizer, PROMPTS, on_text=lambda i, s: pieces.append((i, s)), **GREEDY)
    assert pieces == list(enumerate(got))  # a batch: each completion whole, in order


def test_sampling_follows_the_seed(loaded):
    model, tokenizer = loaded
    settings = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8}
    first = generate(model, tokenizer, PROMPTS, seed=3, **settings)
    assert generate(model, tokenizer, PROMPTS, seed=3, **settings) == first
    assert generate(model, tokenizer, PROMPTS, seed=4, **settings) != first


def test_decoding_keeps_spaces_and_trims_the_end(loaded):
    _, tokenizer = loaded
    code = "f(a , b) ; x = [1 , 2] .  \n\n"
    ids = tokenizer(code).input_ids + [tokenizer.eos_token_id, 7, 8]
    assert completion_text(tokenizer, ids) == code
    assert finish(code, []) == "f(a , b) ; x = [1 , 2] ."
    assert finish(code, [" ;", "("]) == "f"


def test_too_long_and_empty_prompts_are_refused(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="max_seq_len 2048"):
        generate(model, tokenizer, ["x = 1\n" * 700], max_new_tokens=100)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["a", ""])


def test_prompt_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("def a():\n---\n    x = 1\n---\nlast")
    assert read_prompts(text) == ["def a():\n", "    x = 1\n", "last"]
    lines = tmp_path / "prompts.jsonl"
    records = [{"task_id": "t/0", "prompt": "def f():\n    "}, "import sys\n"]
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_prompts(lines) == ["def f():\n    ", "import sys\n"]
    lines.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1: expected a string or an object"):
        read_prompts(lines)


def test_adapter_on_its_base_generates_as_the_merged_model(tiny_checkpoint, tmp_path):
    config = LoraConfig(r=4, target_modules=["Wqkv", "up_proj"], init_lora_weights=False)
    get_peft_model(load_model(tiny_checkpoint), config).save_pretrained(tmp_path / "adapter")
    merge(tmp_path / "adapter", tmp_path / "merged", dtype="fp32", progress=False)
    adapted = generate(*load_for_generation(None, tmp_path / "adapter"), PROMPTS, **GREEDY)
    plain = generate(*load_for_generation(tiny_checkpoint), PROMPTS, **GREEDY)
    assert generate(*load_for_generation(tmp_path / "merged"), PROMPTS, **GREEDY) == adapted
    assert adapted != plain


def test_command_line(loaded, tiny_checkpoint, tmp_path, capsys):
    model, tokenizer = loaded
    want = generate(model, tokenizer, PROMPTS, **GREEDY)
    command = ["generate", "--model", str(tiny_checkpoint), "--temperature", "0"]
    main([*command, "--max-new-tokens", "12", "--prompt", PROMPTS[0]])
    assert capsys.readouterr().out == want[0] + "\n"
    file = tmp_path / "prompts.txt"
    file.write_text("def fib(n):\n---\nimport os\n")
    main([*command, "--max-new-tokens", "12", "--prompt-file", str(file)])
    want_file = generate(model, tokenizer, ["def fib(n):\n", "import os\n"], **GREEDY)
    assert capsys.readouterr().out == "\n---\n".join(want_file) + "\n"
    stop = want[2][len(want[2]) // 2 :][:2]  # given with Python escapes, as for "\\ndef"
    escaped = stop.encode("unicode_escape").decode()
    main([*command, "--max-new-tokens", "12", "--prompt", PROMPTS[2], "--stop", escaped])
    assert capsys.readouterr().out == finish(want[2], [stop]) + "\n"
    (tmp_path / "adapter").mkdir()
    with pytest.raises(SystemExit, match=r"replit-ft generate: .*adapter_config\.json: missing"):
        main([*command, "--adapter", str(tmp_path / "adapter"), "--prompt", "x"])


BAD_OPTIONS = [
    ("batch_size", 0, "must be a positive integer, got 0"),
    ("max_new_tokens", 0, "must be a positive integer, got 0"),
    ("top_p", 1.5, r"must be in \(0, 1\] \(1: off\), got 1.5"),
    ("top_p", 0.0, r"must be in \(0, 1\] \(1: off\), got 0.0"),
    ("temperature", -0.5, r"must be >= 0 \(0: greedy\), got -0.5"),
    ("temperature", float("nan"), r"must be >= 0 \(0: greedy\), got nan"),
    ("top_k", -1, r"must be an integer >= 0 \(0: off\), got -1"),
    ("seed", -1, r"must be an integer in \[0, 2\*\*32\), got -1"),
]


@pytest.mark.parametrize("option, value, message", BAD_OPTIONS)
def test_bad_options_are_named_by_the_library(loaded, option, value, message):
    model, tokenizer = loaded
    with (
        ForwardCounter(model) as counter,
        pytest.raises(OptionError, match=rf"^{option} {message}"),
    ):
        generate(model, tokenizer, PROMPTS, **{option: value})
    assert counter.calls == 0


@pytest.mark.parametrize("option, value, message", BAD_OPTIONS)
def test_bad_options_are_named_by_the_command_line_before_loading(tmp_path, option, value, message):
    """The model does not exist: the option's error comes first, from the library's rule."""
    flag = "--" + option.replace("_", "-")
    command = ["generate", "--model", str(tmp_path / "none"), "--prompt", "x", flag, str(value)]
    with pytest.raises(SystemExit, match=rf"^replit-ft generate: {flag} {message}$"):
        main(command)


def test_bad_stop_sequences(loaded, tmp_path):
    model, tokenizer = loaded
    with pytest.raises(OptionError, match="stop must not be empty"):
        generate(model, tokenizer, PROMPTS, stop=["\n", ""])
    command = ["generate", "--model", str(tmp_path), "--prompt", "x", "--stop"]
    with pytest.raises(SystemExit, match=r"replit-ft generate: --stop must not be empty"):
        main([*command, ""])
    with pytest.raises(SystemExit, match=r"replit-ft generate: --stop '\\\\x': truncated"):
        main([*command, "\\x"])


def test_prompts_are_checked_before_any_batch_runs(loaded):
    model, tokenizer = loaded
    long = "x = 1\n" * 700
    length = len(tokenizer(long).input_ids)
    with ForwardCounter(model) as counter:
        with pytest.raises(ValueError, match=rf"prompt 3 is {length} tokens; .* max_seq_len 2048"):
            generate(model, tokenizer, [*PROMPTS, long], batch_size=1, **GREEDY)
        with pytest.raises(ValueError, match="prompts is one string; pass a list"):
            generate(model, tokenizer, "def f():", **GREEDY)
        with pytest.raises(ValueError, match="prompt 1 is a NoneType, not a string"):
            generate(model, tokenizer, ["a", None], **GREEDY)
    assert counter.calls == 0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty.txt: holds no prompt"),
        ("separators.txt", b"---\n---\n", r"separators.txt: holds no prompt"),
        ("blank.jsonl", b"\n\n", r"blank.jsonl: holds no prompt"),
        ("latin1.txt", b"def f():\n---\ncaf\xe9\n", r"latin1.txt:3: not UTF-8 text \(byte 0xe9\)"),
        ("latin1.jsonl", b'"a"\n"caf\xe9"\n', r"latin1.jsonl:2: not UTF-8 text"),
        ("bad.jsonl", b'"a"\n\n{"prompt": \n', r"bad.jsonl:3: not valid JSON"),
        ("deep.jsonl", b"[" * 100_000, r"deep.jsonl:1: not valid JSON"),
        ("empty.jsonl", b'{"prompt": ""}\n', r"empty.jsonl:1: the prompt is empty"),
        ("object.jsonl", b'{"text": "a"}\n', r"object.jsonl:1: expected a string or an object"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(tmp_path / name)
    command = ["generate", "--model", str(tmp_path), "--prompt-file", str(tmp_path / name)]
    with pytest.raises(SystemExit, match=rf"^replit-ft generate: --prompt-file .*{message}"):
        main(command)


def test_a_folder_that_is_no_checkpoint_is_named_by_its_missing_config(tmp_path):
    (tmp_path / "adapter").mkdir()  # a run folder, say: no config.json, no spiece.model
    with pytest.raises(SystemExit, match=rf"^replit-ft generate: {tmp_path}/config.json: missing"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x"])


@pytest.mark.parametrize("flag", ["--prompt-file", "--suffix-file"])
def test_a_missing_prompt_or_suffix_file_is_named_with_its_option(tmp_path, flag):
    command = ["generate", "--model", str(tmp_path)]
    command += ["--prompt", "x"] if flag == "--suffix-file" else []
    for given, problem in [(tmp_path / "nope.jsonl", "no such file"), (tmp_path, "a folder")]:
        with pytest.raises(SystemExit) as caught:
            main([*command, flag, str(given)])
        assert str(caught.value).startswith(f"replit-ft generate: {flag} {given}: {problem}")


def test_tokenizer_of_another_vocabulary_is_refused(real_tokenizer_dir, tmp_path):
    path = write_checkpoint(
        tmp_path, n_layers=1, d_model=32, n_heads=4, vocab=64, tokenizer=real_tokenizer_dir
    )
    with pytest.raises(ValueError, match=r"tokenizer has 32768 pieces but config.json's vocab_si"):
        load_for_generation(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("spiece.model", b"not a model", r"spiece.model: not a SentencePiece model"),
        ("tokenizer_config.json", b"[1]", r"tokenizer_config.json: holds a JSON array"),
        ("special_tokens_map.json", b"{", r"special_tokens_map.json: not valid JSON"),
    ],
)
def test_broken_tokenizer_files_are_named(tiny_checkpoint, tmp_path, name, content, message):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    (path / name).write_bytes(content)
    with pytest.raises(SystemExit, match=rf"^replit-ft generate: .*{message}"):
        main(["generate", "--model", str(path), "--prompt", "x"])


@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampled"])
def test_nan_weights_are_an_error_not_token_zero(tiny_checkpoint, tmp_path, temperature):
    """Greedy decoding of NaN scores emitted `<|unk|>` forever; sampling failed inside torch."""
    path = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["transformer.norm_f.weight"][5] = float("nan")
    torch.save(state, path / "pytorch_model.bin")
    model, tokenizer = load_for_generation(path)
    with pytest.raises(ValueError, match="next-token scores hold NaN or inf: its weights hold"):
        generate(model, tokenizer, PROMPTS[:1], temperature=temperature, max_new_tokens=4)


def test_help_shows_the_defaults_an_option_has(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "per prompt (default: 256)" in text and "0: greedy (default: 0.2)" in text
    assert "(default: None)" not in text and "(default: [])" not in text
