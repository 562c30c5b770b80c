"""Load time and peak memory of `load_model` on a full-size replit-code-v1-3b checkpoint, on CPU.

What: a random checkpoint with the real model's dimensions and published layout
(32 layers, d_model 2560, n_heads 32, vocab 32768: config.json + one fp32
pytorch_model.bin of 10.4 GB, 2,600,634,880 parameters) is loaded with
  nf4:  `model.loading.load_model(dir, quantization="nf4")`
  bf16: `model.loading.load_model(dir, compute_dtype="bf16")`
each in its own subprocess, on CPU.

How: the checkpoint is written once by `model.random_checkpoint.write_checkpoint` (in a
subprocess: it holds the whole fp32 state dict, ~10.4 GB, while saving) into a
temporary directory renamed to `--dir` when complete, so an interrupted write is never
reused; later runs reuse it. For each load:
  - load time: wall time of the `load_model` call.
  - peak anonymous memory: RssAnon from /proc/self/status, sampled every 20 ms by a
    background thread during the call, maximum reported (absolute, i.e. including the
    interpreter and imported libraries, whose RssAnon before the call is shown too).
    Pages mapped from the checkpoint file (torch.load's mmap) are reclaimable page
    cache and do not count; they do count in RSS.
  - peak RSS, for information: VmHWM / `resource.getrusage` ru_maxrss (equal here).
  - after load: RssAnon and RSS, and the model's `get_memory_footprint()`.
The issue's targets: peak RssAnon under 6 GB for nf4 and under 8 GB for bf16 (GB = 1e9
bytes; GiB also shown). The checkpoint file is usually in the page cache when loaded.

Command (from the repository root; writing takes a few minutes the first time):
    .venv/bin/python bench/load_full.py
    .venv/bin/python bench/load_full.py --dir /tmp/replit-full-random --modes nf4 bf16
(`PYTHONPATH=. .venv/bin/python bench/load_full.py` and `python -m bench.load_full` work too.)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

# Run as `python bench/X.py`, only bench/ would be on the path: put the repository root
# there, so `bench.common` imports one way however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    FULL,
    GB,
    GIB,
    PeakSampler,
    available_memory_bytes,
    emit_result,
    ensure_repo_on_path,
    format_table,
    gb,
    malloc_trim,
    prepare_checkpoint,
    proc_status_bytes,
    reset_peak_rss,
    rss_anon_bytes,
    ru_maxrss_bytes,
    run_worker,
)

DEFAULT_DIR = Path("/tmp/replit-full-random")
MODES = {"nf4": {"quantization": "nf4"}, "bf16": {"compute_dtype": "bf16"}}
TARGETS_GB = {"nf4": 6.0, "bf16": 8.0}
CALLS = {
    "nf4": 'load_model(dir, quantization="nf4")',
    "bf16": 'load_model(dir, compute_dtype="bf16")',
}


def load_worker(mode: str, path: str) -> None:
    """Load the checkpoint once in `mode`, sampling RssAnon, and emit the figures."""
    ensure_repo_on_path()
    import torch
    from transformers.utils import logging as hf_logging

    from model.loading import load_model

    hf_logging.disable_progress_bar()
    gc.collect()
    malloc_trim()
    anon_before = rss_anon_bytes()
    rss_before = proc_status_bytes("VmRSS")
    reset_ok = reset_peak_rss()
    with PeakSampler(rss_anon_bytes, interval=0.02) as anon:
        start = time.perf_counter()
        model = load_model(path, device="cpu", **MODES[mode])
        seconds = time.perf_counter() - start
    peak_rss = max(ru_maxrss_bytes(), proc_status_bytes("VmHWM"))
    dtypes: dict[str, int] = {}
    for p in model.parameters():
        dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
    emit_result(
        {
            "mode": mode,
            "seconds": seconds,
            "threads": torch.get_num_threads(),
            "anon_before": anon_before,
            "rss_before": rss_before,
            "peak_anon": anon.peak,
            "samples": anon.samples,
            "peak_rss": peak_rss if reset_ok else None,
            "anon_after": rss_anon_bytes(),
            "rss_after": proc_status_bytes("VmRSS"),
            "footprint": model.get_memory_footprint(),
            "param_dtypes": dtypes,
            "class": type(model).__name__,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="checkpoint cache dir")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        load_worker(args.worker, str(args.dir))
        return

    print(f"checkpoint {args.dir}: {FULL} ...", flush=True)
    ckpt = prepare_checkpoint(args.dir, **FULL)
    if "error" in ckpt:
        raise SystemExit(f"checkpoint: {ckpt['error']}")
    size = (args.dir / "pytorch_model.bin").stat().st_size
    if ckpt["reused"]:
        print(f"  reused ({size / GB:.2f} GB pytorch_model.bin)", flush=True)
    else:
        print(
            f"  written in {ckpt['seconds']:.0f} s ({size / GB:.2f} GB pytorch_model.bin; "
            f"writer peak RSS {gb(ckpt['peak_rss'])} GB)",
            flush=True,
        )

    results = {}
    for mode in args.modes:
        print(
            f"{mode}: {CALLS[mode]} in a subprocess (MemAvailable "
            f"{available_memory_bytes() / GB:.1f} GB) ...",
            flush=True,
        )
        results[mode] = r = run_worker(Path(__file__), ["--worker", mode, "--dir", str(args.dir)])
        if "error" in r:
            print(f"  -> {r['error']}", flush=True)
        else:
            print(f"  -> {r['seconds']:.1f} s, peak RssAnon {gb(r['peak_anon'])} GB", flush=True)

    headers = [
        "load", "time s", "peak RssAnon GB (GiB)", "target GB", "RssAnon before GB",
        "RssAnon after GB", "peak RSS GB", "RSS after GB", "file pages after GB", "footprint GB",
        "",
    ]  # fmt: skip
    rows = []
    for mode, r in results.items():
        if "error" in r:
            rows.append([mode, r["error"], *["-"] * 8, "FAILED"])
            continue
        ok = r["peak_anon"] < TARGETS_GB[mode] * GB
        rows.append(
            [
                mode,
                f"{r['seconds']:.1f}",
                f"{gb(r['peak_anon'])} ({r['peak_anon'] / GIB:.2f})",
                f"< {TARGETS_GB[mode]:.0f}",
                gb(r["anon_before"]),
                gb(r["anon_after"]),
                gb(r["peak_rss"]),
                gb(r["rss_after"]),
                gb(r["rss_after"] - r["anon_after"]),
                gb(r["footprint"]),
                "MET" if ok else "MISSED",
            ]
        )
    print()
    print(format_table(headers, rows))
    print(
        "\npeak RssAnon: /proc/self/status RssAnon sampled every 20 ms during load_model "
        "(absolute; 'before' is the interpreter + imports). peak RSS: max(VmHWM, "
        "resource.getrusage ru_maxrss), includes file pages mmap'd from the checkpoint. "
        "file pages after: RSS - RssAnon after the load, i.e. checkpoint pages the loaded "
        "model still maps (tensors that alias the mmap keep the whole file mapped). "
        "footprint: model.get_memory_footprint(). GB = 1e9 bytes."
    )
    print("\nraw:", json.dumps(results))


if __name__ == "__main__":
    main()
