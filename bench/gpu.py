"""The full-size model on one GPU: issue 10's figures in one run of at most 10 minutes.

On a CUDA machine: `python bench/gpu.py --out DIR` (bench/gpu_device.sh holds the device
command, with the wheels the device image lacks). Sections run in this order, each
guarded (a failure is reported and the rest still runs), every measurement written to
DIR/gpu.json as soon as it is taken, and tables printed as they come:

1. `matmul`: the card's bf16 rate on an 8192^3 product (median of 10), MFU's denominator.
2. `micro`: the kit's QLoRA step as the recipes build it (`finetune.lora.build_model`: nf4
   + double quant, bf16 compute, LoRA r16 with dropout 0.05 on Wqkv/up_proj/down_proj,
   checkpointing, `auto` attention = flex without flash-attn), under bf16 autocast as the
   Trainer runs it, paged 8-bit AdamW, on random rows of 1x2048, 4x2048 and 1x16384 tokens: tok/s,
   step time, peak memory, MFU. One untimed step (compiling), then the median of 3 timed
   ones (1 where a step takes over 3 s). Every run in this file starts from the same LoRA
   weights (B = 0) on the same rows per shape, with the same dropout draws, so losses are
   comparable across sections.
3. `baseline`: transformers' MptForCausalLM + peft + bitsandbytes (eager: the only
   attention it has) on the same weights and rows at 1x2048 and 4x2048.
4. `agreement`: a packed bf16 row of three documents through every backend, logits
   against eager in fp32 (the full-size check of the block mask built from documents).
5. `levers`, each against the `micro` run of the same shape: `sdpa` (what `auto` choosing
   sdpa for short rows would give; 1x2048, 4x2048), `no_ckpt` (activation checkpointing
   off: no recompute, every activation kept; 1x2048, 4x2048), `bf16_blocks` and
   `bf16_residual` (activations in bf16 inside the blocks; and in the residual stream),
   `fused_lora` and `fused_lora_w` (each LoRA projection as one autograd node; and keeping
   its dequantized weight for backward), `keep_attn` (selective checkpointing keeping
   attention's output) and `compile`
   (regional torch.compile of the blocks) at 4x2048 and 1x16384 (bench/levers.py). Per
   shape, `best` names the fastest lever that agrees. A lever agrees when every step's
   loss is within 1.5x eager's bf16 yardstick (+0.001) of the run without it; the
   yardstick is how far eager attention in bf16 moves the loss from eager in fp32 on the
   4x2048 rows. Two ceilings bound what two levers could save: the chunked loss's
   forward+backward (a fused loss kernel, unbuilt, would replace it) and dequantizing
   every nf4 weight once (a step does it three times: forward, recompute, backward;
   `fused_lora_w` saves one).
6. `ladder`: the longest trainable row. One row of 16k, 32k, 64k, 128k, 256k, 384k tokens,
   first without, then with activation offloading (`train.offload_activations`), each
   ladder stopping at its first out-of-memory; the offloading ladder runs 64k (its cost,
   and its losses against the run without it) and then the lengths the first ladder did
   not reach. A row whose step takes over 10 s gets that one step, compile included. Peak
   GPU memory is linear in the row's length now (no L x L tensor anywhere), so a line
   through each ladder's peaks also predicts the longest row the card's memory allows (a
   prediction, labelled as such; with offloading the host's memory bounds it too). It
   comes last and takes whatever time is left.

Time: `--budget-s` bounds the whole run (default 540 s). Before each measurement its
seconds are predicted (a step-time model through the issue's H100 figures, scaled by
what this run has measured so far, plus a compile allowance for a shape not run yet) and
the measurement is skipped, with the reason written, when it would not fit its section's
share or the whole; an alarm ends the run at the budget's end whatever happens, keeping
what was measured. Run the sections it skipped in a second call (`--sections ...`).

MFU counts model FLOPs, not recomputation: per token 2*N forward and 2*N for the input
gradient (frozen base; 4*N when weights train too), N the matmul parameters (12*d^2 per
layer plus the tied d*V head), and causal attention's 2*L*d per layer and token forward,
times 3, per row of L tokens.

The checkpoint is written once to `--work` (random N(0, 0.02) weights, bf16 safetensors in
the published names). `--tiny` runs every section on a 2-layer model with short rows (CPU
too: there attention is sdpa and offloading only copies) to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import FULL, format_table  # noqa: E402

TINY = {"n_layers": 2, "d_model": 256, "n_heads": 4, "vocab": 4096}
DOCS = (700, 900, 448)  # the packed row of `agreement`
K = 1024
# LoRA dropout as the recipes have it (LoraSection's default); every run reseeds before its
# steps, so runs of the same shape draw the same masks step by step.
DROPOUT = 0.05
SHAPES = {
    "full": {
        "micro": [(1, 2048), (4, 2048), (1, 16 * K)],
        "baseline": [(1, 2048), (4, 2048)],
        "sdpa": [(1, 2048), (4, 2048)],
        "no_ckpt": [(1, 2048), (4, 2048)],  # 1 x 16384 would keep ~97 GB (bench/levers.py)
        "levers": [(4, 2048), (1, 16 * K)],
        "yardstick": (4, 2048),
        "ladder": [16 * K, 32 * K, 64 * K, 128 * K, 256 * K, 384 * K],
        "offload_probe": 64 * K,
    },
    "tiny": {
        "micro": [(1, 256), (4, 256), (1, 1024)],
        "baseline": [(1, 256), (4, 256)],
        "sdpa": [(1, 256), (4, 256)],
        "no_ckpt": [(1, 256), (4, 256)],
        "levers": [(4, 256), (1, 1024)],
        "yardstick": (4, 256),
        "ladder": [1024, 2048, 4096],
        "offload_probe": 4096,
    },
}
# Each section's share of the time left when it starts (the others may take all of it).
SHARES = {"micro": 0.3, "baseline": 0.25, "levers": 0.45}
# Shapes whose step takes longer than this get one timed step, not `--repeats`.
LONG_STEP_S = 3.0
# Ladder rows whose step takes longer than this get one step (which includes compiling).
LADDER_TIMED_S = 10.0


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def peak_reset() -> None:
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if cuda() else None


# ----------------------------------------------------------------------------- time


class OutOfTime(BaseException):
    """The run's budget is spent (raised by the alarm, wherever the run is)."""


def _alarm(signum, frame):
    raise OutOfTime


class Budget:
    """The run's deadline, and each section's."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.section_end = self.end
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(int(seconds), 1))

    def left(self) -> float:
        return min(self.end, self.section_end) - time.perf_counter()

    def section(self, share: float | None) -> None:
        total = self.end - time.perf_counter()
        self.section_end = self.end if share is None else time.perf_counter() + share * total

    def refuse(self, need: float) -> str | None:
        """Why a measurement of `need` seconds must be skipped, or None."""
        left = self.left()
        return None if need <= left else f"skipped: needs ~{need:.0f} s, {left:.0f} s left"


def prior_step_s(rows: int, length: int) -> float:
    """A QLoRA step's seconds on an H100 as the issue measured them (1x2048 0.42 s, 4x2048
    0.78, 1x16384 1.85, 1x65536 16.3, 1x131072 69.7): overhead, dense work, attention."""
    return 0.3 + 5e-5 * rows * length + 3.7e-9 * rows * length**2


class Clock:
    """Predicts a measurement's seconds: the prior scaled by this run's measured steps, plus
    compiling (flex for each new shape; the blocks, for the compile lever)."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self.compile_s = (
            {"flex": 30.0, "blocks": 150.0} if cuda() else {"flex": 0.0, "blocks": 60.0}
        )

    def step(self, rows: int, length: int) -> float:
        scale = statistics.median(self.ratios) if self.ratios else 1.0
        return prior_step_s(rows, length) * scale

    def learn(self, rows: int, length: int, step_s: float) -> None:
        self.ratios.append(step_s / prior_step_s(rows, length))


# ----------------------------------------------------------------------------- pieces


def write_checkpoint(path: Path, dims: dict[str, int]) -> Path:
    """Random weights in the published names, bf16 safetensors, generated on the device."""
    from safetensors.torch import save_file

    from model.checkpoint import expected_shapes
    from model.random_checkpoint import replit_config

    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = replit_config(**dims)
    config.architectures = ["MPTForCausalLM"]
    device = "cuda" if cuda() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("norm_1.weight", "norm_2.weight", "norm_f.weight")):
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
            state[name] = t.mul_(0.02).cpu()
    partial = path / "model.safetensors.partial"
    save_file(state, str(partial), metadata={"format": "pt"})
    config.to_json_file(path / "config.json")
    os.replace(partial, path / "model.safetensors")
    return path


def matmul_tflops() -> float | None:
    """Median bf16 rate of an 8192^3 product over 10 runs after 3 warm-ups."""
    if not cuda():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(13):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def model_flops(dims: dict[str, int], rows: int, length: int, weights_train: bool) -> float:
    """Model FLOPs of one training step on `rows` rows of `length` tokens (module docstring)."""
    d, layers = dims["d_model"], dims["n_layers"]
    n = layers * 12 * d * d + d * dims["vocab"]
    dense = (6 if weights_train else 4) * n * rows * length
    attention = 3 * 2 * rows * length * length * d * layers
    return dense + attention


def mfu(dims, rows, length, weights_train, step_s, rate) -> float | None:
    """Model FLOPs per second over the card's measured bf16 matmul rate (TFLOP/s)."""
    flops = model_flops(dims, rows, length, weights_train)
    return flops / step_s / (rate * 1e12) if rate else None


def random_rows(dims: dict[str, int], rows: int, length: int) -> torch.Tensor:
    """The rows of one shape: the same ones in every section."""
    gen = torch.Generator().manual_seed(rows * 1_000_003 + length)
    ids = torch.randint(3, dims["vocab"], (rows, length), generator=gen)
    return ids.to("cuda" if cuda() else "cpu")


def training_step(model, ids, optimizer, device: str) -> Callable[[], float]:
    """One forward+backward on `ids` under bf16 autocast (as the Trainer runs; on CPU too,
    so that --tiny takes the same dtype paths) and an optimizer step; returns the loss."""

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed_steps(step: Callable[[], float], model, warmup: int, repeats: int) -> dict[str, Any]:
    """`warmup` + `repeats` steps: median seconds of the timed ones (of the first when none
    is timed), peak memory over the timed ones (over all when none is), every loss.

    Out of memory, `model`'s gradients are dropped and {"error": ...} is returned, so that
    the next measurement starts clean.
    """
    losses, times = [], []
    peak_reset()
    try:
        for i in range(warmup + repeats):
            if i == warmup and i:
                peak_reset()
            sync()
            t = time.perf_counter()
            losses.append(step())
            sync()
            times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as e:
        model.zero_grad(set_to_none=True)
        gc.collect()
        peak_reset()
        return {"error": f"out of memory: {e}".splitlines()[0], "losses": losses}
    timed = times[warmup:] or times[:1]
    return {
        "step_s": statistics.median(timed),
        "first_s": times[0],
        "times": times,
        "timed_from": warmup if repeats else 0,
        "losses": losses,
        "peak_gb": peak_gb(),
        "reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda() else None,
    }


def figure_cells(r: dict[str, Any]) -> list[str]:
    """A measured step's table cells: tok/s, step ms, peak GB, MFU (or why there are none)."""
    if "step_s" not in r:
        why = r.get("error") or r.get("skipped") or "-"
        return [why.split(":")[0], "", "", ""]
    return [
        f"{r['tok_s']:.0f}",
        f"{r['step_s'] * 1e3:.0f}",
        f"{r['peak_gb']:.1f}" if r.get("peak_gb") else "-",
        f"{r['mfu']:.1%}" if r.get("mfu") else "-",
    ]


def backends_available() -> list[str]:
    from model.attention import usable_attn_impls

    return usable_attn_impls(torch.device("cuda" if cuda() else "cpu"), torch.bfloat16)


# ----------------------------------------------------------------------------- the run


class Run:
    """What the sections share: the checkpoint, the kit's QLoRA model, time, the report."""

    def __init__(self, args: argparse.Namespace, path: Path, dims: dict[str, int], budget):
        self.args, self.path, self.dims = args, path, dims
        self.shapes = SHAPES["tiny" if args.tiny else "full"]
        self.shapes["ladder"] = args.ladder or self.shapes["ladder"]
        probe = min(self.shapes["offload_probe"], max(self.shapes["ladder"]))
        self.shapes["offload_probe"] = probe
        self.device = "cuda" if cuda() else "cpu"
        self.budget = budget
        self.clock = Clock()
        self.flex_shapes: set[tuple[int, int]] = set()
        self.rate: float | None = None
        self.report: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if cuda() else "cpu",
            "torch": torch.__version__,
            "dims": dims,
            "budget_s": args.budget_s,
        }
        self._ours = None
        self._init: dict[str, torch.Tensor] = {}

    def save(self) -> None:
        target = self.args.out / "gpu.json"
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.report, indent=1))
        os.replace(partial, target)

    def record(self, section: str, key: str, value: Any) -> Any:
        self.report.setdefault(section, {})[key] = value
        self.save()
        return value

    def longest(self) -> int:
        micro = max(length for _, length in self.shapes["micro"])
        return max(micro, *self.shapes["ladder"])

    def ours(self):
        """The kit's QLoRA model, built once for every section (context: the longest row)."""
        if self._ours is None:
            from bench.train import build_qlora

            t = time.perf_counter()
            model = build_qlora(
                "ours", str(self.path), self.longest(), "bf16", self.device, DROPOUT
            )
            self.report["ours_load_s"] = time.perf_counter() - t
            model.train()
            self._init = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
            self._ours = model
        return self._ours

    def optimizer(self, model):
        params = [p for p in model.parameters() if p.requires_grad]
        if cuda():
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
        return torch.optim.AdamW(params, lr=2e-4)

    def measure(
        self,
        model,
        rows: int,
        length: int,
        kind: str,
        *,
        warmup: int | None = None,
        repeats: int | None = None,
    ) -> dict[str, Any]:
        """QLoRA steps at one shape, unless they would not fit the time left.

        `kind`: "ours" (or a lever's name, "offload" included: the kit's model with it
        lever; "sdpa": with sdpa attention), or "baseline". The kit's model starts from its
        initial LoRA weights each time.
        """
        warmup = self.args.warmup if warmup is None else warmup
        if repeats is None:
            long = self.clock.step(rows, length) > LONG_STEP_S
            repeats = 1 if long else self.args.repeats
        ours = kind != "baseline"
        compiles = ["blocks"] if kind == "compile" else []
        flex = ours and kind != "sdpa" and model.get_base_model().attn_impl == "flex"
        if flex and (rows, length) not in self.flex_shapes:
            compiles.append("flex")
        steps = (warmup + repeats) * self.clock.step(rows, length)
        if why := self.budget.refuse(steps + sum(self.clock.compile_s[c] for c in compiles)):
            return {"skipped": why}
        if ours:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self._init:
                        p.copy_(self._init[n])
        optimizer = self.optimizer(model)
        ids = random_rows(self.dims, rows, length)
        torch.manual_seed(0)
        step = training_step(model, ids, optimizer, self.device)
        r = timed_steps(step, model, warmup, repeats)
        del optimizer
        gc.collect()
        if "error" in r:
            return r
        if flex:
            self.flex_shapes.add((rows, length))
        if compiles and (warmup + repeats) > 1:  # the first step's surplus is compiling
            self.clock.compile_s[compiles[0]] = r["first_s"] - r["step_s"]
        self.clock.learn(rows, length, r["step_s"])
        r["tok_s"] = rows * length / r["step_s"]
        r["mfu"] = mfu(self.dims, rows, length, False, r["step_s"], self.rate)
        return r


def shape_name(rows: int, length: int) -> str:
    return f"{rows}x{length}"


def micro(run: Run) -> dict[str, Any]:
    model = run.ours()
    impl = model.get_base_model().attn_impl
    table = []
    for rows, length in run.shapes["micro"]:
        name = shape_name(rows, length)
        r = run.record("micro", name, run.measure(model, rows, length, "ours"))
        table.append([name, impl, *figure_cells(r)])
        print(f"  ours {name}: {figure_cells(r)}, losses {r.get('losses', [])[:2]}", flush=True)
    print(format_table(["ours", "attention", "tok/s", "step ms", "peak GB", "MFU"], table))
    return run.report["micro"]


def baseline(run: Run) -> dict[str, Any]:
    from bench.train import build_qlora

    longest = max(length for _, length in run.shapes["baseline"])
    t = time.perf_counter()
    model = build_qlora("baseline", str(run.path), longest, "bf16", run.device, DROPOUT)
    run.record("baseline", "load_s", time.perf_counter() - t)
    model.train()
    table = []
    for rows, length in run.shapes["baseline"]:
        name = shape_name(rows, length)
        r = run.measure(model, rows, length, "baseline")
        run.record("baseline", name, r)
        table.append([name, *figure_cells(r)])
        print(f"  baseline {name}: {figure_cells(r)}, losses {r.get('losses', [])[:2]}")
        if "error" in r:
            break
    del model
    gc.collect()  # peft's modules hold cycles: free this model before the next one's peak
    peak_reset()
    print(format_table(["baseline", "tok/s", "step ms", "peak GB", "MFU"], table))
    return run.report["baseline"]


def yardstick(run: Run, model) -> dict[str, float]:
    """How far eager attention in bf16 (autocast, as trained) moves the loss from fp32 eager."""
    import bitsandbytes as bnb

    base = model.get_base_model()
    rows, length = run.shapes["yardstick"]
    ids = random_rows(run.dims, rows, length)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    dtypes = [m.compute_dtype for m in layers]
    impl, base.attn_impl = base.attn_impl, "eager"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in run._init:
                p.copy_(run._init[n])
        try:
            with torch.autocast(run.device, dtype=torch.bfloat16):
                bf16 = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
            for m in layers:
                m.compute_dtype = torch.float32
            fp32 = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        finally:
            for m, dtype in zip(layers, dtypes, strict=True):
                m.compute_dtype = dtype
            base.attn_impl = impl
    return {
        "shape": shape_name(rows, length),
        "fp32": fp32,
        "bf16": bf16,
        "dloss": abs(bf16 - fp32),
    }


def compare(before: dict[str, Any], after: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Step-by-step losses of a lever's run against the run without it."""
    a, b = after.get("losses", []), before.get("losses", [])
    n = min(len(a), len(b))
    if not n:
        return {}
    worst = max(abs(x - y) for x, y in zip(a[:n], b[:n], strict=True))
    out = {"max_dloss": worst, "agrees": worst <= tolerance}
    if "step_s" in after and "step_s" in before:
        out["speedup"] = before["step_s"] / after["step_s"]
        if after.get("peak_gb") and before.get("peak_gb"):
            out["peak_ratio"] = after["peak_gb"] / before["peak_gb"]
    return out


def levers(run: Run) -> dict[str, Any]:
    from bench import levers as lv

    model = run.ours()
    base = model.get_base_model()
    stick = run.record("levers", "yardstick", yardstick(run, model))
    tolerance = 1.5 * stick["dloss"] + 1e-3
    print(f"  yardstick {stick}: lever tolerance {tolerance:.4f}", flush=True)
    ceilings = {"dequant_s_per_pass": lv.dequant_seconds(base)}
    for rows, length in run.shapes["levers"]:
        ceilings[f"loss_s@{shape_name(rows, length)}"] = lv.loss_seconds(
            base, rows, length, run.device
        )
    run.record("levers", "ceilings", ceilings)
    print(f"  ceilings {ceilings}", flush=True)
    plans = [
        (lever, shape)
        for lever in lv.LEVERS
        for shape in run.shapes[lever if lever in run.shapes else "levers"]
    ]
    table = []
    for lever, (rows, length) in plans:
        name = f"{lever}@{shape_name(rows, length)}"
        shape = shape_name(rows, length)
        before = run.report.get("micro", {}).get(shape, {})
        if "losses" not in before:  # micro skipped this shape: measure it here, once
            before = run.report["levers"].get(f"before@{shape}", {})
            if "losses" not in before:
                before = run.measure(model, rows, length, "ours")
                run.record("levers", f"before@{shape}", before)
        if "losses" not in before:
            run.record("levers", name, {"skipped": "no run without the lever to compare with"})
            continue
        with lv.LEVERS[lever](base):
            r = run.measure(model, rows, length, lever)
        r.update(compare(before, r, tolerance))
        run.record("levers", name, r)
        cells = figure_cells(r)
        before_cells = figure_cells(before)
        table.append(
            [
                name,
                before_cells[0],
                cells[0],
                f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                cells[2],
                f"{r['max_dloss']:.4f}" if "max_dloss" in r else "-",
                str(r.get("agrees", "-")),
            ]
        )
        print(f"  {name}: {cells}, { ({k: r[k] for k in ('speedup', 'agrees') if k in r}) }")
    print(
        format_table(
            ["lever", "tok/s before", "after", "speedup", "peak GB", "max dloss", "agrees"], table
        )
    )
    best = run.record("levers", "best", best_levers(run.report["levers"]))
    print(f"  fastest agreeing lever per shape: {best}", flush=True)
    return run.report["levers"]


def best_levers(results: dict[str, Any]) -> dict[str, Any]:
    """Per shape, the lever with the largest speedup among those faster at equal losses."""
    best: dict[str, Any] = {}
    for name, r in results.items():
        if "@" not in name or name.startswith("before@") or not isinstance(r, dict):
            continue
        lever, shape = name.split("@")
        if r.get("agrees") and r.get("speedup", 0) > 1:
            if best.get(shape) is None or r["speedup"] > best[shape]["speedup"]:
                best[shape] = {"lever": lever, "speedup": r["speedup"], "tok_s": r["tok_s"]}
                best[shape]["mfu"] = r.get("mfu")
        best.setdefault(shape, None)
    return best


def ladder(run: Run) -> dict[str, Any]:
    """One row ever longer, without then with offloading, to each one's first failure."""
    model = run.ours()
    lengths = run.shapes["ladder"]
    table, reached = [], {}
    modes = [m for m in ("plain", "offload") if m in run.args.ladder_modes]
    for mode in modes:
        if mode == "plain":
            rungs = list(lengths)
        else:
            last = reached.get("plain")
            rungs = [run.shapes["offload_probe"]] if "plain" in modes else []
            rungs += [n for n in lengths if last is None or n > last]
            rungs = sorted(set(rungs))
        for length in rungs:
            name = f"{mode}@{length}"
            micro_r = run.report.get("micro", {}).get(shape_name(1, length))
            if mode == "plain" and micro_r and "step_s" in micro_r:
                r = dict(micro_r, source="micro")
            else:
                r = ladder_rung(run, model, length, mode)
            plain = run.report.get("ladder", {}).get(f"plain@{length}", {})
            if mode == "offload" and "losses" in plain:  # offloading must not move the losses
                r.update(compare(plain, r, 1e-3))
            run.record("ladder", name, r)
            table.append([mode, str(length), *figure_cells(r), f"{r.get('host_gb', 0):.1f}"])
            print(f"  {name}: {figure_cells(r)}", flush=True)
            if "step_s" not in r:
                break
            reached[mode] = length
    run.record("ladder", "longest", reached)
    run.record("ladder", "predicted", predict_longest(run.report["ladder"]))
    print(
        format_table(["ladder", "tokens", "tok/s", "step ms", "peak GB", "MFU", "host GB"], table)
    )
    print(f"  longest trained: {reached}; predicted: {run.report['ladder']['predicted']}")
    return run.report["ladder"]


def ladder_rung(run: Run, model, length: int, mode: str) -> dict[str, Any]:
    """One row of `length` tokens: a step (compiling a new shape: what the ladder asks is
    whether it fits), and a timed second one when that is cheap; with offloading, a fresh
    host pool and how much it held."""
    base = model.get_base_model()
    step = run.clock.step(1, length)
    two = 2 * step + run.clock.compile_s["flex"]
    repeats = 1 if step <= LADDER_TIMED_S and run.budget.refuse(two) is None else 0
    if mode == "offload":
        base.activation_offloading_enable()
    try:
        r = run.measure(model, 1, length, mode, warmup=1, repeats=repeats)
    finally:
        if mode == "offload":
            off = base.activation_offload
            base.activation_offloading_disable()
            gc.collect()  # the pool's page-locked buffers go back before the next length
    if mode == "offload":
        r.update(offloaded_gb=off.last_bytes / 1e9, host_gb=off.pool.bytes / 1e9)
    if not repeats and "step_s" in r:
        r["note"] = "one step: its time includes compiling this shape"
    return r


def predict_longest(results: dict[str, Any]) -> dict[str, Any]:
    """Per mode, a line through (length, peak GB) of the rows that trained, and the length
    where it meets the card's memory (and, offloading, where host memory runs out)."""
    if not cuda():
        return {}
    card = torch.cuda.get_device_properties(0).total_memory / 1e9
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    out = {"card_gb": card, "host_gb": host}
    for mode in ("plain", "offload"):
        points = [
            (int(k.split("@")[1]), v)
            for k, v in results.items()
            if k.startswith(f"{mode}@") and isinstance(v, dict) and v.get("peak_gb")
        ]
        if len(points) < 2:
            continue
        xs = [n for n, _ in points]
        slope, icept = _line(xs, [v["peak_gb"] for _, v in points])
        longest = (card - icept) / slope if slope > 0 else None
        line = {"gb_per_token": slope, "gb_at_0": icept, "longest_by_card": longest}
        if mode == "offload":
            hslope, hicept = _line(xs, [v.get("host_gb", 0.0) for _, v in points])
            line["longest_by_host"] = (host - hicept) / hslope if hslope > 0 else None
        out[mode] = line
    return out


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def agreement(run: Run) -> dict[str, Any]:
    """Logits of a packed bf16 row for each backend against eager in fp32."""
    from model import load_model

    if why := run.budget.refuse(60 if cuda() else 5):
        return {"skipped": why}
    device, dims = run.device, run.dims
    gen = torch.Generator().manual_seed(1)
    length = sum(DOCS)
    ids = torch.randint(3, dims["vocab"], (1, length), generator=gen).to(device)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None].to(device)
    ref_model = load_model(run.path, compute_dtype="fp32", attn_impl="eager", device=device)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    del ref_model
    model = load_model(run.path, compute_dtype="bf16", attn_impl="eager", device=device)
    rows = {}
    for impl in backends_available():
        model.attn_impl = impl
        with torch.no_grad():
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        err = (out - ref).abs()
        rows[impl] = {"max_abs": err.max().item(), "mean_abs": err.mean().item()}
    eager = rows["eager"]
    for row in rows.values():
        row["agrees"] = row["max_abs"] <= 1.5 * eager["max_abs"] + 0.05 and (
            row["mean_abs"] <= 1.5 * eager["mean_abs"]
        )
    print(
        format_table(
            ["backend (bf16)", "max |logit - fp32 eager|", "mean", "agrees"],
            [
                [k, f"{v['max_abs']:.4f}", f"{v['mean_abs']:.5f}", str(v["agrees"])]
                for k, v in rows.items()
            ],
        ),
        flush=True,
    )
    return rows


SECTIONS: dict[str, Callable[[Run], Any]] = {
    "matmul": lambda run: matmul_tflops(),
    "micro": micro,
    "baseline": baseline,
    "levers": levers,
    "ladder": ladder,
    "agreement": agreement,
}
DEFAULT_SECTIONS = ["matmul", "micro", "baseline", "agreement", "levers", "ladder"]


def summary(report: dict[str, Any]) -> None:
    """Ours against the baseline per shape; what was skipped."""
    lines = []
    for name, theirs in report.get("baseline", {}).items():
        ours = report.get("micro", {}).get(name, {})
        if isinstance(theirs, dict) and "tok_s" in theirs and "tok_s" in ours:
            line = f"{name}: ours/baseline tok/s {ours['tok_s'] / theirs['tok_s']:.2f}x"
            if ours.get("peak_gb") and theirs.get("peak_gb"):
                line += f", peak GB {ours['peak_gb']:.1f} / {theirs['peak_gb']:.1f}"
            if ours.get("mfu"):
                line += f", MFU ours {ours['mfu']:.1%}"
            lines.append(line)
    skipped = [
        f"{section}/{key}"
        for section, results in report.items()
        if isinstance(results, dict)
        for key, r in results.items()
        if isinstance(r, dict) and "skipped" in r
    ]
    skipped += [s for s in DEFAULT_SECTIONS if report.get(f"{s}_status") == "not run"]
    print("\n".join(lines))
    if skipped:
        print(f"skipped for time (run them with --sections ...): {', '.join(skipped)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_gpu"))
    parser.add_argument("--work", type=Path, help="checkpoint folder (default OUT/full|tiny)")
    parser.add_argument(
        "--tiny", action="store_true", help="2 layers, short rows: check the script"
    )
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per shape")
    parser.add_argument(
        "--repeats", type=int, help="timed steps per shape (3, 1 for slow shapes; --tiny 1)"
    )
    parser.add_argument("--sections", nargs="+", default=DEFAULT_SECTIONS, choices=list(SECTIONS))
    parser.add_argument("--ladder", type=int, nargs="+", help="row lengths of the ladder")
    parser.add_argument(
        "--ladder-modes", nargs="+", default=["plain", "offload"], choices=["plain", "offload"]
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    dims = TINY if args.tiny else FULL
    args.repeats = args.repeats if args.repeats is not None else 1 if args.tiny else 3
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from model import modeling

        modeling.PER_TOKEN_CHUNK = 2048  # the ladder's 4096 row runs in chunks, as 131072 would
    budget = Budget(args.budget_s)  # from here: writing the checkpoint counts too
    t = time.perf_counter()
    work = args.work or args.out / ("tiny" if args.tiny else "full")
    path = write_checkpoint(work, dims)
    run = Run(args, path, dims, budget)
    run.report["checkpoint_s"] = time.perf_counter() - t
    print(f"{run.report['device']}, torch {torch.__version__}, backends {backends_available()}")
    print(f"checkpoint ready in {run.report['checkpoint_s']:.1f} s", flush=True)
    try:
        for name in args.sections:
            run.report[f"{name}_status"] = "not run"
        for name in args.sections:
            print(f"\n== {name} ({run.budget.end - time.perf_counter():.0f} s left)", flush=True)
            run.budget.section(SHARES.get(name))
            t = time.perf_counter()
            try:
                result = SECTIONS[name](run)
                run.report[name] = result
                run.report[f"{name}_status"] = "done"
            except OutOfTime:
                run.report[f"{name}_status"] = "stopped: budget spent"
                raise
            except Exception as e:  # one section's failure must not cost the others' figures
                traceback.print_exc()
                run.report[f"{name}_status"] = f"failed: {type(e).__name__}: {e}"
            if name == "matmul":
                run.rate = run.report.get("matmul")
                print(f"bf16 matmul: {run.rate} TFLOP/s")
            run.report[f"{name}_s"] = time.perf_counter() - t
            print(f"({name}: {run.report[f'{name}_s']:.0f} s)", flush=True)
            run.save()
    except OutOfTime:
        print("\nbudget spent: stopping; what was measured is in gpu.json", flush=True)
    signal.alarm(0)
    run.save()
    summary(run.report)


if __name__ == "__main__":
    main()
