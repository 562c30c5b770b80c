"""Train LoRA adapters from a recipe: `replit-ft train RECIPE [key=value ...]`.

Also `accelerate launch -m finetune.train RECIPE ...` or `torchrun -m finetune.train ...`
for several processes. The run folder (`train.output_dir`) ends up holding:

    adapter/        adapter_config.json + adapter_model.safetensors (peft)
    recipe.yaml     the resolved recipe, overrides applied
    metrics.json    the log history and a summary
    loss.png        train and evaluation loss per step
    checkpoint-N/   the last `keep_last` checkpoints; `train.resume=true` continues
                    from the newest complete one with the same data order, schedule
                    and optimizer state
    data/           the packed dataset, unless `data.out` points elsewhere

Training runs on transformers' `Trainer`: it already does gradient accumulation with
token-level loss normalisation (it counts the labelled tokens of the whole step and
passes `num_items_in_batch` to the model), warmup schedules, checkpoint rotation,
exact resumption (RNG, sampler position, optimizer) and DDP/FSDP/DeepSpeed through
accelerate. The kit adds what it lacks: packed rows taken as they are (no second
tokenization, documents kept apart by `position_ids`), a progress bar with tokens/s,
choosing only complete checkpoints to resume from, and the summary and plot.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from peft import get_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from data_prep.code import collect_code
from data_prep.prepare import prepare
from finetune.lora import build_model
from finetune.recipe import Recipe, load_recipe, recipe_dict
from finetune.report import write_report
from model.testing import write_checkpoint

OPTIMIZERS = {"adamw": "adamw_torch", "paged_adamw_8bit": "paged_adamw_8bit", "lion": "lion_32bit"}


def train(recipe: Recipe) -> Path:
    """Run the recipe; return the adapter folder."""
    state = PartialState()
    cfg = recipe.train
    out = Path(cfg.output_dir)
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}")
    if cfg.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        raise ValueError("train.optimizer=paged_adamw_8bit needs CUDA; use adamw on CPU")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("train.wandb=true needs wandb: pip install wandb")
    if cfg.schedule not in ("cosine", "linear"):
        raise ValueError(f"train.schedule must be cosine or linear, got {cfg.schedule!r}")
    if not 0 <= cfg.eval_humaneval <= 164:
        raise ValueError(f"train.eval_humaneval must be 0 (off) to 164, got {cfg.eval_humaneval}")
    # Before training, so a machine that cannot sandbox generated code fails now, not after.
    sandbox = _humaneval_sandbox() if cfg.eval_humaneval and state.is_main_process else None
    data_cfg = recipe.data
    data_cfg.out = data_cfg.out or str(out / "data")
    data_cfg.tokenizer = data_cfg.tokenizer or recipe.model.name

    with state.main_process_first():  # rank 0 writes the base and the data; the rest reuse them
        tiny_missing = not (Path(recipe.model.name) / "config.json").is_file()
        if state.is_main_process and recipe.model.tiny and tiny_missing:
            _write_tiny_base(recipe)
        data = prepare(data_cfg, progress=state.is_main_process).load()
    data.set_format("torch")

    device = torch.device(cfg.device) if cfg.device else state.device
    set_seed(cfg.seed)  # LoRA's initial A matrices come from the global generator
    model = build_model(
        recipe.model,
        recipe.lora,
        seq_len=data_cfg.seq_len,
        device=device,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    if state.is_main_process:
        model.print_trainable_parameters()
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(recipe), sort_keys=False))

    has_eval = len(data["validation"]) > 0
    bf16 = cfg.bf16 if cfg.bf16 is not None else _bf16_supported(device)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.schedule,
        optim=OPTIMIZERS[cfg.optimizer],
        max_grad_norm=cfg.max_grad_norm,
        bf16=bf16,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_every,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.keep_last,
        logging_steps=cfg.log_every,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["tensorboard"] + (["wandb"] if cfg.wandb else []),
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * data_cfg.seq_len * state.num_processes
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if has_eval else None,
        data_collator=default_data_collator,
        callbacks=[Progress(tokens_per_step, enabled=state.is_main_process)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume = newest_checkpoint(out) if cfg.resume else None
    if cfg.resume and state.is_main_process:
        print(
            f"resuming from {resume}" if resume else f"no complete checkpoint in {out}: fresh start"
        )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    digests = _gather(adapter_digest(get_peft_model_state_dict(model)))
    if sandbox is not None:
        pass_at_1 = _humaneval(model, recipe, sandbox, out / "humaneval")
        trainer.log({"eval_humaneval_pass@1": pass_at_1})  # TensorBoard: eval/humaneval_pass@1
    if state.is_main_process:
        summary = {
            "train_loss": result.training_loss,
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - started, 2),
            "tokens_per_second": _rate(trainer.state, tokens_per_step),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "seq_len": data_cfg.seq_len,
            "resumed_from": str(resume) if resume else None,
            "adapter_sha256_per_rank": digests,
        }
        if sandbox is not None:
            summary |= {"humaneval_pass@1": pass_at_1, "humaneval_problems": cfg.eval_humaneval}
        write_report(out, trainer.state.log_history, summary)
    state.wait_for_everyone()
    return adapter


def _humaneval_sandbox():
    from finetune.sandbox import Sandbox

    return Sandbox()


def _humaneval(model, recipe: Recipe, sandbox, out: Path) -> float:
    """Greedy pass@1 of the trained model on the first train.eval_humaneval problems."""
    from finetune.humaneval import evaluate_loaded
    from model import load_tokenizer

    about = {"model": f"{recipe.model.name} + the adapter just trained"}
    tokenizer = load_tokenizer(recipe.model.name)
    limit = recipe.train.eval_humaneval
    return evaluate_loaded(out, sandbox, model, tokenizer, about, limit=limit)["pass@1"]


def adapter_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over an adapter's tensors in name order: equal digests, identical adapters."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _gather(value: str) -> list[str]:
    """`value` from every rank (DDP must have kept the adapters identical)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def newest_checkpoint(out: Path) -> Path | None:
    """The highest-numbered checkpoint whose trainer state was written (Trainer writes it last)."""
    complete = [
        p
        for p in out.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _write_tiny_base(recipe: Recipe) -> None:
    """The offline demo's base: random weights, a SentencePiece model trained on the data's code."""
    tiny = recipe.model.tiny
    corpus = collect_code(
        recipe.data.code, include=recipe.data.include, exclude=recipe.data.exclude
    )
    texts = [line for doc in corpus.documents for line in doc.completion.splitlines(True)]
    write_checkpoint(
        recipe.model.name,
        n_layers=tiny.n_layers,
        d_model=tiny.d_model,
        n_heads=tiny.n_heads,
        vocab=tiny.vocab,
        tokenizer=texts,
        seed=recipe.train.seed,
        std=tiny.std,
    )


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _rate(state, tokens_per_step: int) -> float | None:
    runtime = next(
        (h["train_runtime"] for h in reversed(state.log_history) if "train_runtime" in h), None
    )
    return round(state.global_step * tokens_per_step / runtime, 1) if runtime else None


class Progress(TrainerCallback):
    """One progress bar: step, loss, learning rate, tokens/s and ETA (tqdm's)."""

    def __init__(self, tokens_per_step: int, enabled: bool):
        self.tokens_per_step = tokens_per_step
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.started = 0.0
        self.first_step = 0
        self.postfix: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train")
            self.started, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        steps = state.global_step - self.first_step
        rate = steps * self.tokens_per_step / max(time.perf_counter() - self.started, 1e-9)
        self.postfix["tok/s"] = f"{rate:,.0f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, name in (("loss", "loss"), ("eval_loss", "eval"), ("learning_rate", "lr")):
            if key in logs and isinstance(logs[key], float) and math.isfinite(logs[key]):
                self.postfix[name] = f"{logs[key]:.4g}"
        self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m finetune.train RECIPE [key=value ...]` (what `replit-ft train` runs)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: replit-ft train RECIPE [key.sub=value ...]")
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except (OSError, ValueError) as err:
        sys.exit(f"replit-ft train: {err}")
    adapter = train(recipe)
    if PartialState().is_main_process:
        summary = json.loads((adapter.parent / "metrics.json").read_text())["summary"]
        print(f"adapter: {adapter}\n" + "\n".join(f"  {k}: {v}" for k, v in summary.items()))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
