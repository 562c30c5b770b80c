"""What `load_model`'s glibc mmap threshold costs and saves on CPU: the same step, two allocators.

What: bench/attention.py's own step worker for ours only (`load_model(path,
attn_impl="sdpa")`, fp32, every weight trainable, forward with labels + backward, batch 1)
on its 2-layer, d_model 2560 checkpoint, with
  mmap 128 KiB: `load_model` as shipped, which fixes glibc's mmap threshold at 128 KiB so
                that freed activations go back to the OS;
  glibc heap:   the same, with `MALLOC_MMAP_THRESHOLD_=1073741824` in the environment,
                which `load_model` leaves alone: freed activations stay in glibc's heap
                and are reused without page faults.
How: each run is its own subprocess, 1 warm-up + `--repeats` timed steps; the two settings
alternate for `--rounds` rounds, so drift on the shared machine hits both alike. Printed:
the median step over all rounds, and the step peak memory as bench/attention.py defines it
(`bench.common.StepMemory`), median over rounds.

Command (from the repository root; about 17 min with the defaults):
    .venv/bin/python bench/allocator.py [--lengths 2048 4096] [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import FULL, format_table, gb, median, prepare_checkpoint, run_worker  # noqa: E402

SETTINGS = {"mmap 128 KiB": {}, "glibc heap": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30)}}
ATTENTION_BENCH = Path(__file__).with_name("attention.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after 1 warm-up")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/replit-bench-2l"))
    args = parser.parse_args()

    dims = {**FULL, "n_layers": 2}
    if "error" in (ckpt := prepare_checkpoint(args.dir, **dims)):
        raise SystemExit(f"checkpoint: {ckpt['error']}")
    runs: dict[tuple[str, int], list[dict]] = {(s, n): [] for s in SETTINGS for n in args.lengths}
    for rnd in range(args.rounds):
        for length in args.lengths:
            for setting, env in SETTINGS.items():
                worker = ["--worker", "ours", "--dir", str(args.dir), "--lengths", str(length)]
                worker += ["--repeats", str(args.repeats)]
                r = run_worker(ATTENTION_BENCH, worker, env=env)
                if "error" in r:
                    raise SystemExit(f"{setting} at {length}: {r['error']}")
                runs[setting, length].append(r)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {setting} L={length}: steps "
                    f"{', '.join(f'{t:.2f}' for t in r['times'])} s, step peak "
                    f"{gb(r['step_bytes'])} GB",
                    flush=True,
                )

    rows, ratios = [], []
    for length in args.lengths:
        step, peak = {}, {}
        for setting in SETTINGS:
            step[setting] = median([t for r in runs[setting, length] for t in r["times"]])
            peak[setting] = median([r["step_bytes"] for r in runs[setting, length]])
            rows.append(
                [setting, str(length), f"{step[setting]:.2f}", f"{length / step[setting]:.1f}",
                 gb(peak[setting])]
            )  # fmt: skip
        ours, heap = "mmap 128 KiB", "glibc heap"
        ratios.append(
            [str(length), f"{step[ours] / step[heap]:.3f}", f"{peak[ours] / peak[heap]:.3f}",
             gb(peak[heap] - peak[ours])]
        )  # fmt: skip
    print()
    headers = ["allocator", "tokens", "step s (median)", "tokens/s", "step peak GB"]
    print(format_table(headers, rows))
    print()
    headers = ["tokens", "step time 128 KiB / heap", "step peak 128 KiB / heap", "GB saved"]
    print(format_table(headers, ratios))


if __name__ == "__main__":
    main()
