"""The full-size model on one GPU: what issues 2 and 4 measure on a card.

Run on a CUDA machine: `python bench/gpu.py [--out DIR]`. Sections, each one guarded so
that a failure is reported and the rest still runs; figures are printed as tables and
written to DIR/gpu.json as they come:

1. `matmul`: the card's bf16 rate on an 8192^3 product (median of 10), MFU's denominator.
2. `agreement`: a packed bf16 row of three documents (2048 tokens) through every backend,
   logits against eager in fp32. A backend agrees when its error is no larger than
   eager's own bf16 error (x1.5, and 0.05 absolute slack for the order of bf16 sums).
3. `backends`: bf16 forward+backward tok/s and peak memory at 2048 and 8192 tokens, all
   weights trainable, activation checkpointing, for eager / sdpa / flex (/ flash).
4. `qlora`: the recipes' set-up (`finetune.lora.build_model`: nf4 + double quant, bf16
   compute, LoRA r16 on Wqkv/up_proj/down_proj, checkpointing), under bf16 autocast as
   the Trainer runs it, with paged 8-bit AdamW, at 2048/8192/16384 tokens: tok/s, peak
   memory, MFU. Then the same steps for transformers' MptForCausalLM + peft + bnb
   (`bench.train.build_qlora("baseline", ...)`), where it fits.

MFU counts model FLOPs, not recomputation: per token 2*N forward and 2*N for the input
gradient (frozen base; 4*N when weights train too), N the matmul parameters (12*d^2 per
layer plus the tied d*V head), and causal attention's 2*T*d per layer forward, times 3.

The checkpoint is written once to DIR (random N(0, 0.02) weights, bf16 safetensors in
the published names: the layout `load_model` reads, quicker to write than the fp32 bin).
`--tiny` runs every section on a 2-layer model (CPU too) to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
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

TINY = {"n_layers": 2, "d_model": 256, "n_heads": 4, "vocab": 32768}
DOCS = (700, 900, 448)  # the packed row of `agreement`


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


def write_checkpoint(path: Path, dims: dict[str, int]) -> Path:
    """Random weights in the published names, bf16 safetensors, generated on the device."""
    from safetensors.torch import save_file

    from model.checkpoint import expected_shapes
    from model.testing import replit_config

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
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(path / "config.json")
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


def model_flops(dims: dict[str, int], tokens: int, weights_train: bool) -> float:
    """Model FLOPs of one training step on one row of `tokens` (see the module docstring)."""
    d, layers = dims["d_model"], dims["n_layers"]
    n = layers * 12 * d * d + d * dims["vocab"]
    dense = (6 if weights_train else 4) * n * tokens
    attention = 3 * 2 * tokens * tokens * d * layers
    return dense + attention


def mfu(
    dims: dict[str, int], tokens: int, weights_train: bool, step_s: float, rate: float | None
) -> float | None:
    """Model FLOPs per second over the card's measured bf16 matmul rate (TFLOP/s)."""
    return model_flops(dims, tokens, weights_train) / step_s / (rate * 1e12) if rate else None


def training_step(
    model: torch.nn.Module,
    ids: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    autocast: str | None,
) -> Callable[[], float]:
    """One forward+backward on `ids` (an optimizer step when given, under bf16 autocast
    on device `autocast` when given, as the Trainer runs); returns the loss."""

    def step() -> float:
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def figure_cells(r: dict[str, Any]) -> list[str]:
    """A measured step's table cells: tok/s, step ms, peak GB, MFU."""
    return [
        f"{r['tok_s']:.0f}",
        f"{r['step_s'] * 1e3:.0f}",
        f"{r['peak_gb']:.1f}" if r["peak_gb"] else "-",
        f"{r['mfu']:.1%}" if r["mfu"] else "-",
    ]


def timed_steps(
    step: Callable[[], float], model: torch.nn.Module, warmup: int, repeats: int
) -> dict[str, Any]:
    """Run `step` (returns the loss); median seconds of the timed runs and peak memory.

    Out of memory, `model`'s gradients are dropped and {"error": ...} is returned, so that
    the next measurement starts clean.
    """
    losses, times = [], []
    try:
        for i in range(warmup + repeats):
            if i == warmup:
                peak_reset()
            sync()
            t = time.perf_counter()
            losses.append(step())
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as e:
        model.zero_grad(set_to_none=True)
        peak_reset()
        return {"error": f"out of memory: {e}".splitlines()[0]}
    return {
        "step_s": statistics.median(times),
        "times": times,
        "losses": losses,
        "peak_gb": peak_gb(),
    }


def backends_available() -> list[str]:
    from model.attention import usable_attn_impls

    return usable_attn_impls(torch.device("cuda" if cuda() else "cpu"), torch.bfloat16)


def agreement(path: Path, dims: dict[str, int]) -> dict[str, Any]:
    """Logits of a packed bf16 row for each backend against eager in fp32."""
    from model import load_model

    device = "cuda" if cuda() else "cpu"
    gen = torch.Generator().manual_seed(1)
    length = sum(DOCS)
    ids = torch.randint(3, dims["vocab"], (1, length), generator=gen).to(device)
    pos = torch.cat([torch.arange(n) for n in DOCS])[None].to(device)
    ref_model = load_model(path, compute_dtype="fp32", attn_impl="eager", device=device)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    del ref_model
    model = load_model(path, compute_dtype="bf16", attn_impl="eager", device=device)
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


def backends(
    path: Path,
    dims: dict[str, int],
    lengths: list[int],
    rate: float | None,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """bf16 forward+backward of the whole model per backend and length."""
    from model import load_model

    device = "cuda" if cuda() else "cpu"
    model = load_model(
        path, compute_dtype="bf16", attn_impl="eager", device=device, max_seq_len=max(lengths)
    )
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    results, rows = {}, []
    for length in lengths:
        ids = torch.randint(3, dims["vocab"], (1, length), generator=gen).to(device)
        for impl in backends_available():
            if impl == "flex" and not cuda():
                continue  # FlexAttention has no CPU backward
            model.attn_impl = impl
            key = f"{impl}@{length}"
            r = results[key] = timed_steps(
                training_step(model, ids, None, None), model, warmup, repeats
            )
            if "error" in r:
                rows.append([impl, str(length), "OOM", "", "", ""])
                continue
            r["tok_s"] = length / r["step_s"]
            r["mfu"] = mfu(dims, length, True, r["step_s"], rate)
            rows.append([impl, str(length), *figure_cells(r)])
            print(f"  {key}: {r['tok_s']:.0f} tok/s", flush=True)
    print(
        format_table(["backend", "tokens", "tok/s", "step ms", "peak GB", "MFU"], rows), flush=True
    )
    return results


def qlora(
    path: Path,
    dims: dict[str, int],
    lengths: list[int],
    rate: float | None,
    warmup: int,
    repeats: int,
    kinds: list[str],
) -> dict[str, Any]:
    """QLoRA steps of the kit's set-up (and the baseline's), as the trainer runs them."""
    from bench.train import build_qlora

    device = "cuda" if cuda() else "cpu"
    results, rows = {}, []
    for kind in kinds:
        peak_reset()
        t = time.perf_counter()
        model = build_qlora(kind, str(path), max(lengths), "bf16", device)
        load_s = time.perf_counter() - t
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if cuda():
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
        else:
            optimizer = torch.optim.AdamW(params, lr=2e-4)
        base = model.get_base_model()
        impl = getattr(base, "attn_impl", None) or base.config._attn_implementation
        print(
            f"{kind}: built in {load_s:.1f} s, attention {impl}, "
            f"{sum(p.numel() for p in params):,} trainable",
            flush=True,
        )
        gen = torch.Generator().manual_seed(3)
        for length in lengths:
            ids = torch.randint(3, dims["vocab"], (1, length), generator=gen).to(device)
            key = f"{kind}@{length}"
            r = results[key] = timed_steps(
                training_step(model, ids, optimizer, device), model, warmup, repeats
            )
            if "error" in r:
                rows.append([kind, impl, str(length), "OOM", "", "", ""])
                break
            r.update(attn_impl=impl, load_s=load_s, tok_s=length / r["step_s"])
            r["mfu"] = mfu(dims, length, False, r["step_s"], rate)
            rows.append([kind, impl, str(length), *figure_cells(r)])
            print(f"  {key}: {r['tok_s']:.0f} tok/s, first losses {r['losses'][:2]}", flush=True)
        del model, optimizer, params
        gc.collect()  # peft's modules hold cycles: free this model before the next one's peak
        peak_reset()
    print(
        format_table(["model", "attention", "tokens", "tok/s", "step ms", "peak GB", "MFU"], rows),
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_gpu"))
    parser.add_argument("--tiny", action="store_true", help="2 layers: check the script")
    parser.add_argument("--backend-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--qlora-lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--baseline-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--sections", nargs="+", default=["matmul", "qlora", "agreement", "backends", "baseline"]
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    dims = TINY if args.tiny else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda() else "cpu",
        "torch": torch.__version__,
        "dims": dims,
    }
    print(f"{report['device']}, torch {torch.__version__}, backends {backends_available()}")

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1))

    t = time.perf_counter()
    path = write_checkpoint(args.out / ("tiny" if args.tiny else "full"), dims)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s", flush=True)
    rate = None
    sections: dict[str, Callable[[], Any]] = {
        "matmul": matmul_tflops,
        "qlora": lambda: qlora(
            path, dims, args.qlora_lengths, rate, args.warmup, args.repeats, ["ours"]
        ),
        "agreement": lambda: agreement(path, dims),
        "backends": lambda: backends(
            path, dims, args.backend_lengths, rate, args.warmup, args.repeats
        ),
        "baseline": lambda: qlora(
            path, dims, args.baseline_lengths, rate, args.warmup, args.repeats, ["baseline"]
        ),
    }
    for name in args.sections:
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception as e:  # one section's failure must not cost the others' figures
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        if name == "matmul":
            rate = report[name] if isinstance(report[name], float) else None
            print(f"bf16 matmul: {rate} TFLOP/s")
        report[f"{name}_s"] = time.perf_counter() - t
        print(f"({name}: {report[f'{name}_s']:.0f} s)", flush=True)
        save()
    for length in args.baseline_lengths:
        ours = report.get("qlora", {}).get(f"ours@{length}", {})
        theirs = report.get("baseline", {}).get(f"baseline@{length}", {})
        if "tok_s" in ours and "tok_s" in theirs:
            line = f"{length} tokens: ours/baseline tok/s {ours['tok_s'] / theirs['tok_s']:.2f}x"
            if ours["peak_gb"]:
                line += f", peak memory ratio {ours['peak_gb'] / theirs['peak_gb']:.3f}"
            print(line)
    save()


if __name__ == "__main__":
    main()
