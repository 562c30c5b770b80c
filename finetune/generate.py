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
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

from data_prep.fim import FimSettings, fim_prompt
from finetune.adapter import check_adapter
from finetune.lora import peft_quietly
from finetune.run_folder import RECORD, read_record
from model import ReplitForCausalLM, ReplitTokenizer, load_model, load_tokenizer

SEPARATOR = re.compile(r"^---$\n?", re.MULTILINE)


def load_for_generation(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    *,
    attn_impl: str = "auto",
) -> tuple[ReplitForCausalLM | PeftModel, ReplitTokenizer]:
    """The model and tokenizer to generate with: a checkpoint, or a base with a LoRA adapter.

    With an adapter, `model` is the base (default: the one the adapter names); the
    adapter is checked against it first and applied by peft on the full-precision base,
    at the context it was trained at.
    """
    if adapter is None:
        if model is None:
            raise ValueError("name a model, or an adapter (whose base is then used)")
        return load_model(model, attn_impl=attn_impl), load_tokenizer(model)
    info = check_adapter(adapter, model)
    base = load_model(info.base_path, max_seq_len=info.max_seq_len, attn_impl=attn_impl)
    with peft_quietly():
        tuned = PeftModel.from_pretrained(base, str(info.path)).eval()
    return tuned, load_tokenizer(info.base_path)


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
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if suffix is not None:
        if isinstance(suffix, str) or len(suffix) != len(prompts):
            raise ValueError(f"give one suffix per prompt ({len(prompts)}), as a list")
        if fim is None:
            raise ValueError("a suffix needs the model's fill-in-the-middle settings: fim=")
        if max(fim.sentinel_ids) >= model.config.vocab_size:
            raise ValueError(
                f"fim sentinel ids {sorted(fim.sentinel_ids)} are not in the model's "
                f"vocabulary of {model.config.vocab_size}"
            )
    elif empty := [i for i, p in enumerate(prompts) if not p]:
        raise ValueError(f"prompt {empty[0]} is empty: the model needs at least one token")
    if "" in stop:
        raise ValueError("an empty stop sequence would stop before the first token")
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
        if width + max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"prompts of {width} tokens plus max_new_tokens {max_new_tokens} exceed the "
                f"model's max_seq_len {model.config.max_seq_len}"
            )
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
                streamer=streamer,
            )
        for offset, row in enumerate(output[:, width:].tolist()):
            text = finish(completion_text(tokenizer, row), stop, trim=trim)
            results.append(text)
            if on_text is not None and streamer is None:
                on_text(start + offset, text)
    return results


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
    lines between prompts."""
    path = Path(file)
    text = path.read_text()
    if path.suffix != ".jsonl":
        return [p for p in SEPARATOR.split(text) if p]
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
        prompt = record.get(key) if isinstance(record, dict) else record
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: expected a string or an object with a {key}")
        prompts.append(prompt)
    return prompts
