"""Train LoRA adapters from a recipe: `replit-ft train RECIPE [key=value ...]`.

Also `accelerate launch -m finetune.train RECIPE ...` or `torchrun -m finetune.train ...`
for several processes. What the run folder holds, and when a checkpoint counts as
complete, is `finetune.run_folder`'s business.

A run is fresh, resumed (`train.resume=true`) or replaced (`train.overwrite=true`). A
fresh run refuses a folder that holds an earlier one. A resumed run must be the same
run: it compares the recipe with the saved one (only the keys in `RESUMABLE` may
change, and the change is printed) and the data with the saved fingerprint, and it
continues from the newest complete checkpoint, skipping corrupt ones. All of that is
checked before anything in the run folder is written.

Training runs on transformers' `Trainer`: it already does gradient accumulation with
token-level loss normalisation (it counts the labelled tokens of the whole step and
passes `num_items_in_batch` to the model), warmup schedules, exact resumption (RNG,
sampler position, optimizer) and DDP/FSDP/DeepSpeed through accelerate. The kit adds
what it lacks: packed rows taken as they are (no second tokenization, documents kept
apart by `position_ids`), checks before any work, checkpoints sealed only when on disk,
a schedule that follows a raised `max_steps`, one process doing the data and the
printing, and the summary and plot.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from peft import get_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

from data_prep.files import is_disk_full, write_atomic
from data_prep.prepare import Prepared, prepare
from data_prep.report import summary as data_summary
from finetune.demo_base import ensure_tiny_base
from finetune.lora import build_model
from finetune.recipe import (
    RESUMABLE,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_dict,
    recipe_from_dict,
)
from finetune.report import write_report
from finetune.run_folder import (
    RunFolder,
    read_json,
    read_record,
    seal_checkpoint,
    write_json,
    write_record,
)
from model.attention import resolve_attn_impl
from model.loading import parse_dtype

OPTIMIZERS = {"adamw": "adamw_torch", "paged_adamw_8bit": "paged_adamw_8bit", "lion": "lion_32bit"}


@dataclass
class Plan:
    """How this run starts: fresh, or from a checkpoint of the same run."""

    resume_from: Path | None
    data_fingerprint: str | None  # the run's data, when resuming: the data must not change
    finished: bool = False  # resuming a run that already wrote its adapter at max_steps


def train(recipe: Recipe, *, quiet: bool = False) -> Path:
    """Run the recipe; return the adapter folder."""
    cfg = recipe.train
    if quiet:  # the kit's own bars obey `quiet`; transformers' weight-loading bar too
        transformers.utils.logging.disable_progress_bar()
    device = _device(cfg.device)
    check_environment(recipe, device)
    state = PartialState(cpu=device.type == "cpu")
    main = state.is_main_process
    run = RunFolder(Path(cfg.output_dir))
    # One launch per run folder: a second one (a command run twice, a resume while the run
    # still trains) would clear or interleave this one's checkpoints. Its main process holds
    # the lock; a refused main process ends its launch.
    with run.exclusive() if main else contextlib.nullcontext():
        return _train(recipe, run, state, device, quiet=quiet)


def _train(
    recipe: Recipe, run: RunFolder, state: PartialState, device: torch.device, *, quiet: bool
) -> Path:
    """`train` once the run folder is this launch's."""
    cfg = recipe.train
    main = state.is_main_process
    say = _say if main else _silent
    plan = plan_run(run, recipe, state.num_processes, say)
    # Before any work, so a machine that cannot sandbox generated code fails now, not after.
    sandbox = _humaneval_sandbox() if cfg.eval_humaneval and main else None

    prepared: list[Prepared | None] = [None]
    if main:  # one process writes the demo base and the data; the others read them
        ensure_tiny_base(recipe)
        prepared[0] = prepare(recipe.data, progress=not quiet, expect=plan.data_fingerprint)
        say(data_summary(prepared[0]))
    broadcast_object_list(prepared)
    if plan.finished:  # transformers' loop, resumed at max_steps, would train one step more
        say(
            f"resume: the run in {run.path} already ran its train.max_steps={cfg.max_steps} "
            f"steps: nothing to do. Its adapter: {run.adapter} (raise train.max_steps to train on)"
        )
        return run.adapter
    data = prepared[0].load()
    data.set_format("torch")

    if main:
        if cfg.overwrite:
            run.clear()
        _drop_unusable_checkpoints(run, plan, say)
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run.recipe, yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
        info = {"data_fingerprint": prepared[0].manifest["fingerprint"]}
        write_json(run.info, info | {"processes": state.num_processes})
    state.wait_for_everyone()

    set_seed(cfg.seed)  # LoRA's initial A matrices come from the global generator
    model = build_model(
        recipe.model,
        recipe.lora,
        seq_len=recipe.data.seq_len,
        device=device,
        gradient_checkpointing=cfg.gradient_checkpointing,
        offload_activations=cfg.offload_activations,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    has_eval = len(data["validation"]) > 0
    bf16 = cfg.bf16 if cfg.bf16 is not None else _bf16_supported(device)
    args = TrainingArguments(
        output_dir=str(run.path),
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
        save_total_limit=None,  # KitTrainer rotates, counting complete checkpoints only
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
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)  # transformers' documented knob
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum * state.num_processes
    tokens_per_step = rows_per_step * recipe.data.seq_len
    trainer = KitTrainer(
        run=run,
        keep_last=cfg.keep_last,
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if has_eval else None,
        data_collator=default_data_collator,
        callbacks=[LogLastStep(), Progress(tokens_per_step, enabled=main and not quiet)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.perf_counter()
    resume = str(plan.resume_from) if plan.resume_from else None
    if plan.resume_from is not None and _step_of(plan.resume_from) == cfg.max_steps:
        trainer.load_last_checkpoint(plan.resume_from)
    else:
        trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    digests = _gather(adapter_digest(get_peft_model_state_dict(model)))
    trainer.save_model(str(run.adapter))
    if sandbox is not None:
        pass_at_1 = _humaneval(
            model, recipe, sandbox, run.humaneval, digests[0], progress=not quiet
        )
        trainer.log({"eval_humaneval_pass@1": pass_at_1})  # TensorBoard: eval/humaneval_pass@1
    if main:
        history = trainer.state.log_history
        steps_run = trainer.state.global_step - _step_of(plan.resume_from)
        summary = {
            "final_train_loss": _last(history, "loss"),
            "final_eval_loss": _last(history, "eval_loss"),
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 3),
            "tokens": trainer.state.global_step * tokens_per_step,
            "processes": state.num_processes,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(steps_run * tokens_per_step / seconds, 1),
            "trainable_parameters": trainable,
            "seq_len": recipe.data.seq_len,
            "resumed_from": resume,
            "adapter_sha256_per_rank": digests,
        }
        if sandbox is not None:
            summary |= {"humaneval_pass@1": pass_at_1, "humaneval_problems": cfg.eval_humaneval}
        write_report(run.metrics, run.plot, history, summary)
        write_record(run.adapter, training_record(recipe, prepared[0], model, summary))
    state.wait_for_everyone()
    return run.adapter


def check_environment(recipe: Recipe, device: torch.device) -> None:
    """What the recipe needs of this machine, checked before any data or model work."""
    cfg = recipe.train
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"train.device={cfg.device}: this machine has no CUDA device")
    if cfg.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise RecipeError("train.optimizer=paged_adamw_8bit needs CUDA; use adamw on CPU")
    if cfg.offload_activations and device.type != "cuda":
        raise RecipeError(
            "train.offload_activations=true moves activations from a GPU to host memory; "
            f"this run is on {device.type}: set it to false"
        )
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise RecipeError("train.wandb=true needs wandb: pip install wandb")
    sharded = [name for name in ("FSDP", "DEEPSPEED") if _env_true(f"ACCELERATE_USE_{name}")]
    if sharded and device.type != "cuda":
        raise RecipeError(
            f"the accelerate config {_accelerate_config()} uses {sharded[0]}, which the kit runs "
            "on GPUs only, and this machine has none; for data parallelism on CPU use "
            "recipes/accelerate/ddp.yaml or torchrun --standalone --nproc_per_node N"
        )
    dtype = recipe.model.compute_dtype or ("bf16" if device.type == "cuda" else "fp32")
    try:
        resolve_attn_impl(recipe.model.attn_impl, device, parse_dtype(dtype))
    except (ImportError, ValueError) as err:
        raise RecipeError(f"model.attn_impl={recipe.model.attn_impl}: {err}") from None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() == "true"


def _accelerate_config() -> str:
    """The --config_file that `accelerate launch` was given (read from its command line)."""
    for pid in (os.getppid(), os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            if flag == b"--config_file":
                return os.fsdecode(value)
    return "(accelerate's default config)"


def plan_run(run: RunFolder, recipe: Recipe, processes: int, say) -> Plan:
    """Fresh, overwrite or resume: refuse what would lose or mix up a run. Writes nothing."""
    cfg = recipe.train
    if not cfg.resume:
        run.check_fresh(cfg.overwrite)
        return Plan(None, None)
    if not run.holds_run():
        run.check_fresh(overwrite=False)
        say(f"resume: no earlier run in {run.path}: starting afresh")
        return Plan(None, None)
    if not run.recipe.is_file() or not run.info.is_file():
        raise RecipeError(
            f"train.resume=true: {run.path} holds a run without {run.recipe.name} and "
            f"{run.info.name}, so it cannot be checked; start afresh with train.overwrite=true"
        )
    saved = recipe_from_dict(yaml.safe_load(run.recipe.read_text()) or {}, str(run.recipe))
    info = read_json(run.info)
    fixed, changed = compare_recipes(saved, recipe)
    if info.get("processes") != processes:
        fixed.append(("processes", info.get("processes"), processes))
    if fixed:
        lines = "\n".join(
            f"  {key}: {old!r} when the run started, {new!r} now" for key, old, new in fixed
        )
        raise RecipeError(
            f"train.resume=true: this is not the run in {run.path}:\n{lines}\n"
            f"A resumed run may change only train.{', train.'.join(RESUMABLE)}. Restore the "
            "values above, or start a new run (another train.output_dir, or train.overwrite=true)."
        )
    for key, old, new in changed:
        say(f"resume: {key} {old!r} -> {new!r}")
    checkpoint = run.newest_complete_checkpoint(say)
    step = _step_of(checkpoint)
    if step > cfg.max_steps:
        raise RecipeError(
            f"train.resume=true: {checkpoint} is past train.max_steps={cfg.max_steps}, and a run "
            f"cannot be shortened: give train.max_steps={step} or more, or start a new run "
            "(another train.output_dir, or train.overwrite=true)"
        )
    record = read_record(run.adapter) if step == cfg.max_steps else None
    if record is not None and record.get("summary", {}).get("steps") == step:
        return Plan(checkpoint, info.get("data_fingerprint"), finished=True)
    say(f"resume: from {checkpoint}" if checkpoint else "resume: no complete checkpoint, step 0")
    return Plan(checkpoint, info.get("data_fingerprint"))


def compare_recipes(old: Recipe, new: Recipe) -> tuple[list[tuple], list[tuple]]:
    """(key, old, new) of the keys that differ: those a resume cannot change, and the rest."""
    flat_old, flat_new = _flatten(recipe_dict(old)), _flatten(recipe_dict(new))
    ignored = {"train.resume", "train.overwrite"}
    fixed, changed = [], []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        a, b = flat_old.get(key), flat_new.get(key)
        if a == b or key in ignored:
            continue
        (changed if key.removeprefix("train.") in RESUMABLE else fixed).append((key, a, b))
    return fixed, changed


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "template":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _drop_unusable_checkpoints(run: RunFolder, plan: Plan, say) -> None:
    """Checkpoints after the one resumed from (incomplete or corrupt) would be written again."""
    for checkpoint in run.drop_after(plan.resume_from):
        say(f"removed {checkpoint.name}: it comes after the step the run continues from")


def training_record(
    recipe: Recipe, data: Prepared, model, summary: dict[str, Any]
) -> dict[str, Any]:
    """What an adapter folder records about its training, so it describes itself anywhere."""
    return {
        "base": recipe.model.name,
        "max_seq_len": model.get_base_model().config.max_seq_len,
        "quantization": recipe.model.quantization,
        "data": {
            "fingerprint": data.manifest["fingerprint"],
            "tokenizer_sha256": data.manifest["tokenizer"]["sha256"],
            "seq_len": recipe.data.seq_len,
            "splits": data.manifest["splits"],
        },
        "fim": data.manifest.get("fim"),
        "recipe": recipe_dict(recipe),
        "summary": summary,
    }


class KitTrainer(Trainer):
    """Trainer with sealed, rotated checkpoints and a schedule that follows `max_steps`."""

    def __init__(self, *args: Any, run: RunFolder, keep_last: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run, self.keep_last = run, keep_last

    def _save_checkpoint(self, model, trial) -> None:
        checkpoint = self.run.path / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                seal_checkpoint(checkpoint)
                self.run.rotate(self.keep_last)
        except (OSError, RuntimeError) as err:
            if not is_disk_full(err):
                raise
            raise OSError(
                f"no space left on the device while writing {checkpoint}: free some space, then "
                "continue with train.resume=true (the incomplete checkpoint is skipped)"
            ) from None

    def load_last_checkpoint(self, checkpoint: Path) -> None:
        """The weights and state of the checkpoint at `max_steps`, without training.

        transformers' loop, resumed at `max_steps`, runs one step more: a run killed after
        its last checkpoint (while writing its adapter, or in its HumanEval) then ends with
        another adapter than the one it trained. Sharded models are loaded once prepared,
        by that loop only, so under FSDP or DeepSpeed this is refused.
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise RecipeError(
                f"train.resume=true: the run stopped after its last checkpoint {checkpoint}; "
                "under FSDP or DeepSpeed the kit cannot finish it without a training step: "
                f"give train.max_steps={self.args.max_steps + 1}"
            )
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load them, then set the learning rate from the schedule of this run's `max_steps`.

        The optimizer state holds the learning rate of the step it was saved at. After a
        resume with a larger `max_steps` that rate belongs to the old schedule (0 at the end
        of an old cosine): recomputing it from the restored step count gives the rate of a
        run planned with the new `max_steps`, and the same rate when nothing changed.
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.lr_scheduler is not None:
            self.lr_scheduler.last_epoch -= 1
            self.lr_scheduler.step()


def _humaneval_sandbox():
    from finetune.sandbox import Sandbox

    return Sandbox()


def _humaneval(
    model, recipe: Recipe, sandbox, out: Path, adapter_sha256: str, *, progress: bool
) -> float:
    """Greedy pass@1 of the trained model on the first train.eval_humaneval problems.

    The adapter's digest tells a journal of this adapter (the eval of a run killed while it
    evaluated) from one of another (a resumed run trains on): the first is resumed, the
    second replaced, as the run must end either way.
    """
    from finetune.humaneval import evaluate_loaded
    from model import load_tokenizer

    about = {
        "model": f"{recipe.model.name} + the adapter just trained",
        "adapter_sha256": adapter_sha256,
    }
    tokenizer = load_tokenizer(recipe.model.name)
    limit = recipe.train.eval_humaneval
    results = evaluate_loaded(
        out, sandbox, model, tokenizer, about, limit=limit, restart=True, progress=progress
    )
    return results["pass@1"]


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


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    return next((h[key] for h in reversed(history) if key in h), None)


def _say(message: str) -> None:
    print(message, flush=True)


def _silent(message: str) -> None:
    pass


class LogLastStep(TrainerCallback):
    """Log the last step too, so the final train loss covers the run's last steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


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


def report_lines(run: RunFolder) -> str:
    """The end of a run, as the user reads it: losses, amounts, speed and where things are."""
    summary = read_json(run.metrics)["summary"]

    def loss(value: float | None) -> str:
        return "none" if value is None else f"{value:.4f}"

    return "\n".join(
        [
            f"done: {summary['steps']} steps, {summary['epochs']:g} epochs, "
            f"{summary['tokens']:,} tokens on {summary['processes']} process(es)",
            f"  loss        train {loss(summary['final_train_loss'])}, "
            f"eval {loss(summary['final_eval_loss'])}",
            f"  speed       {summary['tokens_per_second']:,.0f} tokens/s "
            f"({summary['seconds']:.0f} s)",
            f"  adapter     {run.adapter}",
            f"  loss plot   {run.plot}",
            f"  metrics     {run.metrics}",
            f"  tensorboard tensorboard --logdir {run.tensorboard}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m finetune.train [--quiet] RECIPE [key=value ...]` (what `replit-ft train` runs)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet = "--quiet" in argv
    argv = [a for a in argv if a != "--quiet"]
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: replit-ft train [--quiet] RECIPE [key.sub=value ...]")
    try:
        recipe = load_recipe(argv[0], argv[1:])
        adapter = train(recipe, quiet=quiet)
    except (OSError, ValueError) as err:
        # Every process of a multi-process run finds the same error; one says it.
        sys.exit(f"replit-ft train: {err}" if os.environ.get("RANK", "0") == "0" else 1)
    if PartialState().is_main_process:
        print(report_lines(RunFolder(adapter.parent)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
