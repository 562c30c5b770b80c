"""`generate`: completions from a checkpoint (merged, or a base with a LoRA adapter).

transformers' `generate()` does the decoding (KV cache, sampling, batches with left
padding) on the kit's network. What the kit adds is the replit-code-v1-3b decode rules,
applied the same way to returned and streamed text: generation stops at EOS or at a
stop sequence, the text is cut at the first stop sequence, trailing whitespace is
trimmed, and tokens are decoded with no clean-up of spaces.

Fill in the middle: given a suffix for each prompt, the prompt is the prefix, and the
model, trained with `data.fim_rate` > 0, writes what goes between them. The prompt is
laid out with the sentinels and in the order the model was trained with (the `fim`
block its folder's replit_ft.json records: `fim_settings`); the middle is returned as
generated, trailing whitespace included, since it is inserted between the two as is.

Prompt files (`read_prompts`): `*.jsonl` holds one JSON object per line whose "prompt"
is used (HumanEval's layout; other keys are ignored) or one JSON string per line; any
other file holds prompts separated by lines that read exactly `---`, each prompt its
lines as written, newlines included (so a prompt can end in a newline but not in spaces:
use JSON lines for exact control). Suffixes come from files of the same layout; in
JSON lines, under the key "suffix", so one HumanEval-infilling style file can give both.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    set_seed,
)
from transformers.generation.streamers import BaseStreamer

from data_prep.fim import FimSettings, fim_prompt
from finetune.adapter import check_adapter
from finetune.lora import peft_quietly
from finetune.run_folder import RECORD, read_record
from model import ReplitForCausalLM, ReplitTokenizer, load_model, load_tokenizer
from model.checkpoint import read_config, resolve_checkpoint

SEPARATOR = re.compile(r"^---$\n?", re.MULTILINE)


def load_for_generation(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    *,
    attn_impl: str = "auto",
    quantization: str | None = None,
    max_seq_len: int | None = None,
) -> tuple[ReplitForCausalLM | PeftModel, ReplitTokenizer]:
    """The model and tokenizer to generate with: a checkpoint, or a base with a LoRA adapter.

    With an adapter, `model` is the base (default: the one the adapter names); the
    adapter is checked against it first and applied by peft on the base, at the context
    it was trained at. `quantization` ("nf4", "int8") loads the base in 4 or 8 bits;
    `max_seq_len` raises the context to at least that.
    """
    if adapter is None:
        if model is None:
            raise ValueError("name a model, or an adapter (whose base is then used)")
        path = resolve_checkpoint(model)
        config = read_config(path)  # first: a folder that is no checkpoint says so
        tokenizer = load_tokenizer(path)
        _check_vocab(path, tokenizer, config.vocab_size)
        loaded = load_model(
            path, quantization=quantization, max_seq_len=max_seq_len, attn_impl=attn_impl
        )
        return loaded, tokenizer
    info = check_adapter(adapter, model)
    tokenizer = load_tokenizer(info.base_path)
    _check_vocab(info.base_path, tokenizer, info.base_config.vocab_size)
    base = load_model(
        info.base_path,
        quantization=quantization,
        max_seq_len=max(info.max_seq_len, max_seq_len or 0),
        attn_impl=attn_impl,
    )
    with peft_quietly():
        tuned = PeftModel.from_pretrained(base, str(info.path)).eval()
    return tuned, tokenizer


def _check_vocab(path: str | os.PathLike, tokenizer: ReplitTokenizer, vocab_size: int) -> None:
    """The tokenizer's ids are the embedding's rows: prompts and completions need both alike."""
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} pieces but config.json's "
            f"vocab_size is {vocab_size}; generation needs a tokenizer of the model's vocabulary"
        )


def fim_settings(folder: str | os.PathLike) -> FimSettings:
    """The fill-in-the-middle settings a model or adapter folder was trained with: the
    `fim` block of its replit_ft.json (which train and merge write)."""
    record = read_record(folder)
    path = Path(folder) / RECORD
    if record is None or record.get("fim") is None:
        raise ValueError(
            f"this model was not trained for fill-in-the-middle (no fim settings in {path})"
        )
    return FimSettings.from_dict(record["fim"], where=f"{path}: fim")


def generate(
    model: ReplitForCausalLM | PeftModel,
    tokenizer: ReplitTokenizer,
    prompts: Sequence[str],
    *,
    suffix: Sequence[str] | None = None,
    fim: FimSettings | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 4,
    stop: Sequence[str] = (),
    seed: int | None = None,
    batch_size: int = 8,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The completion of each prompt (without the prompt), in order.

    temperature 0 decodes greedily; otherwise tokens are sampled with `top_p` (1 for
    none) and `top_k` (0 for none). The defaults are the base model card's. Prompts go
    in batches of `batch_size`, left-padded. `on_text(i, text)` receives text of prompt
    i as soon as it is final: piece by piece while a batch of one generates, else each
    completion whole when its batch is done; the pieces add up to the returned strings.

    With `suffix` (one per prompt, the text after the cursor) and the model's `fim`
    settings (`fim_settings(folder)`), each prompt is the prefix and the result is the
    middle, not trimmed.
    """
    check_options(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        seed=seed,
        batch_size=batch_size,
    )
    if suffix is None:
        _check_prompts(tokenizer, prompts, max_new_tokens, model.config.max_seq_len)
    else:
        _check_fim(model, prompts, suffix, fim)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,  # the published generation_config.json turns the cache off
        **(sampling if temperature > 0 else {}),
    )
    if seed is not None:
        set_seed(seed)
    trim = suffix is None
    results: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        if suffix is None:
            inputs = tokenizer(batch, padding=True, padding_side="left", return_tensors="pt")
        else:
            ids = [
                fim_prompt(tokenizer, prefix, after, fim)
                for prefix, after in zip(batch, suffix[start : start + batch_size], strict=True)
            ]
            inputs = tokenizer.pad(
                {"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt"
            )
        width = inputs.input_ids.shape[1]
        streamer = None
        if on_text is not None and len(batch) == 1:
            streamer = _Streamer(tokenizer, stop, lambda text, i=start: on_text(i, text), trim)
        with torch.no_grad():
            output = model.generate(
                **inputs.to(model.device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(
                    [StopOnText(tokenizer, stop, width)] if stop else []
                ),
                logits_processor=LogitsProcessorList([RefuseNonFinite(model.dtype)]),
                streamer=streamer,
            )
        for offset, row in enumerate(output[:, width:].tolist()):
            text = finish(completion_text(tokenizer, row), stop, trim=trim)
            results.append(text)
            if on_text is not None and streamer is None:
                on_text(start + offset, text)
    return results


class OptionError(ValueError):
    """A setting of `generate` out of its range; `option` is the parameter's name."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem


def check_options(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop: Sequence[str],
    seed: int | None,
    batch_size: int,
) -> None:
    """Refuse a setting of `generate` out of its range, naming it (an `OptionError`).

    `generate` calls it first; a caller with slow work to do before generating (the
    command line loads a model) calls it earlier, so the rule for each setting is here once.
    """
    for option, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise OptionError(option, f"must be a positive integer, got {value!r}")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise OptionError("temperature", f"must be >= 0 (0: greedy), got {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise OptionError("top_p", f"must be in (0, 1] (1: off), got {top_p!r}")
    if not _is_int(top_k) or top_k < 0:
        raise OptionError("top_k", f"must be an integer >= 0 (0: off), got {top_k!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise OptionError("seed", f"must be an integer in [0, 2**32), got {seed!r}")
    if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
        raise OptionError("stop", f"must be a list of strings, got {stop!r}")
    if "" in stop:
        raise OptionError("stop", "must not be empty: it would stop before the first token")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_prompts(
    tokenizer: ReplitTokenizer, prompts: Sequence[str], max_new_tokens: int, max_seq_len: int
) -> None:
    """Every prompt a non-empty string that leaves room for `max_new_tokens`, before any batch."""
    if isinstance(prompts, str):
        raise ValueError("prompts is one string; pass a list of prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if not prompt:
            raise ValueError(f"prompt {i} is empty: the model needs at least one token")
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids] if prompts else []
    for i, length in enumerate(lengths):
        if length + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt {i} is {length} tokens; with max_new_tokens {max_new_tokens} that "
                f"exceeds the model's max_seq_len {max_seq_len}"
            )


def _check_fim(model, prefixes: Sequence[str], suffix: Sequence[str], fim) -> None:
    """One suffix string per prefix string, and sentinels the model's vocabulary has."""
    for name, texts in (("prompts", prefixes), ("suffix", suffix)):
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise ValueError(f"{name}: pass a list of strings")
    if len(suffix) != len(prefixes):
        raise ValueError(f"give one suffix per prompt ({len(prefixes)}), got {len(suffix)}")
    if fim is None:
        raise ValueError("a suffix needs the model's fill-in-the-middle settings: fim=")
    if max(fim.sentinel_ids) >= model.config.vocab_size:
        raise ValueError(
            f"fim sentinel ids {sorted(fim.sentinel_ids)} are not in the model's "
            f"vocabulary of {model.config.vocab_size}"
        )


def completion_text(tokenizer: ReplitTokenizer, ids: Sequence[int]) -> str:
    """Generated ids as text: up to the first EOS, padding dropped, spaces kept as decoded."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    while ids and ids[-1] == tokenizer.pad_token_id:  # rows that finished before the batch
        ids.pop()
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def finish(text: str, stop: Sequence[str], *, trim: bool = True) -> str:
    """Cut `text` at the first stop sequence and (`trim`) trim trailing whitespace."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].rstrip() if trim else text[:cut]


class StopOnText(StoppingCriteria):
    """Stops each row once its generated text (not the prompt) holds a stop sequence.

    Hand-written rather than transformers' `stop_strings`, which matches token strings
    across the prompt's end too: decoding the generated text keeps the rule the same as
    the cut that `finish` makes afterwards.
    """

    def __init__(self, tokenizer: ReplitTokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
        done = [
            any(s in completion_text(self.tokenizer, row) for s in self.stop)
            for row in input_ids[:, self.prompt_width :].tolist()
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class RefuseNonFinite(LogitsProcessor):
    """Stops generation with an error when the next-token scores hold NaN or +inf.

    A checkpoint with inf or NaN weights (or activations overflowing fp16) gives such
    scores: greedy decoding then emits token 0 over and over, and sampling fails deep
    inside torch. -inf is left alone: top-k and top-p put it there on purpose.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise ValueError(
                "the model's next-token scores hold NaN or inf: its weights hold inf or NaN, "
                f"or its activations overflow {self.dtype}"
            )
        return scores


class _Streamer(BaseStreamer):
    """Passes on text of a batch of one as it becomes final under `finish`'s rules.

    A transformers `TextStreamer` would print a stop sequence, or whitespace that is later
    trimmed, before it is known to be cut; this one holds back trailing whitespace and any
    tail that could begin a stop sequence until the next tokens settle it.
    """

    def __init__(
        self,
        tokenizer: ReplitTokenizer,
        stop: Sequence[str],
        emit: Callable[[str], None],
        trim: bool,
    ):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.emit = emit
        self.trim = trim
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = finish(completion_text(self.tokenizer, self.ids), self.stop, trim=self.trim)
        held = max(
            (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )
        self._show(text[: len(text) - held])

    def end(self) -> None:
        self._show(finish(completion_text(self.tokenizer, self.ids), self.stop, trim=self.trim))

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.emit(text[len(self.shown) :])
            self.shown = text


def read_prompts(file: str | os.PathLike, key: str = "prompt") -> list[str]:
    """Prompts (or suffixes: `key`) from a file: JSON lines (`*.jsonl`) or text with `---`
    lines between prompts.

    A file that is not UTF-8, holds no prompt, or has a line that is not a prompt is an
    error naming the file (and the line).
    """
    path = Path(file)
    if not path.is_file():
        problem = "a folder, not a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{path}: {problem}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save it as UTF-8"
        ) from err
    if path.suffix != ".jsonl":
        prompts = [p for p in SEPARATOR.split(text) if p]
    else:
        lines = enumerate(text.splitlines(), 1)
        prompts = [_jsonl_prompt(path, n, line, key) for n, line in lines]
        prompts = [p for p in prompts if p is not None]
    if not prompts:
        raise ValueError(f"{path}: holds no {key}")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str, key: str) -> str | None:
    """The prompt (`key`) on one line of a JSON lines file; None for a blank line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
    prompt = record.get(key) if isinstance(record, dict) else record
    if not isinstance(prompt, str):
        raise ValueError(f"{path}:{number}: expected a string or an object with a {key}")
    if not prompt and key == "prompt":
        raise ValueError(f"{path}:{number}: the prompt is empty")
    return prompt
