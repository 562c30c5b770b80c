"""The model card of a merged checkpoint: training summary and the base's license terms."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.adapter import Adapter

LICENSE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
BASE_URL = "https://huggingface.co/replit/replit-code-v1-3b"


def model_card(info: Adapter, name: str, dtype: torch.dtype) -> str:
    """README.md: what the checkpoint is, how it was trained, how to use it, and the attribution."""
    rows = "\n".join(f"| {key} | {value} |" for key, value in _training_rows(info, dtype).items())
    if info.record is None:
        rows += "\n\nThe adapter has no replit_ft.json: how it was trained is not recorded."
    # The hub checks base_model against its repositories: only a hub id belongs there.
    hub_base = "" if Path(info.base).expanduser().exists() else f"base_model: {info.base}\n"
    weights = dtype_name(dtype)
    context = ""
    if info.max_seq_len != info.base_config.max_seq_len:
        context = f" `max_seq_len` was raised to {info.max_seq_len}, the length trained at;"
    return f"""---
license: cc-by-sa-4.0
{hub_base}library_name: transformers
pipeline_tag: text-generation
tags:
- code
- lora
---

# {name}

[replit-code-v1-3b]({BASE_URL}) fine-tuned with a LoRA adapter (replit-ft) that is merged
into the weights: a plain transformers MPT checkpoint that needs no remote code.

## Training

| | |
| --- | --- |
{rows}

## Use

```python
from transformers import AutoModelForCausalLM
from model import load_tokenizer  # replit-ft: ids exactly as SentencePiece's

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = load_tokenizer("{name}")
ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=False))
```

Decode with `clean_up_tokenization_spaces=False`, or spaces in code are lost. The tokenizer
appends no EOS (id 1) by itself; padding is id 2, on the left for batched generation.

## License and attribution

This model is a derivative of [replit-code-v1-3b]({BASE_URL}) by Replit, Inc., licensed
under [CC BY-SA 4.0]({LICENSE_URL}). Changes: a LoRA adapter was fine-tuned as described
above and merged into the weights;{context} the weights were converted to {weights}
safetensors; the vocabulary (`spiece.model`) is unchanged. This model is licensed under
the same license, [CC BY-SA 4.0]({LICENSE_URL}).
"""


def _training_rows(info: Adapter, dtype: torch.dtype) -> dict[str, str]:
    """The model card's table: the adapter's settings, then its record's recipe and summary."""
    lora = info.config
    targets = lora.get("target_modules")
    variants = [v for v, key in (("DoRA", "use_dora"), ("rsLoRA", "use_rslora")) if lora.get(key)]
    rows = {
        "base": f"`{info.base}`",
        "LoRA": f"r {lora.get('r')}, alpha {lora.get('lora_alpha')}"
        + "".join(f", {v}" for v in variants),
        "targets": ", ".join(sorted(targets)) if isinstance(targets, list) else f"`{targets}`",
        "max_seq_len": str(info.max_seq_len),
        "weights": f"{dtype_name(dtype)} safetensors",
    }
    data = (info.recipe or {}).get("data") or {}
    if sources := [*(data.get("code") or []), *(data.get("instructions") or [])]:
        rows["data"] = ", ".join(f"`{s}`" for s in sources)
    train = (info.recipe or {}).get("train") or {}
    for key in ("lr", "micro_batch_size", "grad_accum", "schedule"):
        if key in train:
            rows[key.replace("_", " ")] = str(train[key])
    for key in ("steps", "final_train_loss", "final_eval_loss", "tokens", "tokens_per_second"):
        value = (info.summary or {}).get(key)
        if value is not None:
            rows[key.replace("_", " ")] = f"{value:.4g}" if isinstance(value, float) else str(value)
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
