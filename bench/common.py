"""Helpers shared by the benchmarks in `bench/`: process memory, worker subprocesses, tables.

Every measurement runs in its own child process (`run_worker`) so that its peak memory
is its own: the parent imports neither torch nor the kit. A worker prints one line
`RESULT {json}` on stdout, which the parent parses; anything else it prints is passed on.

Memory figures come from Linux: `/proc/self/status` (VmRSS, RssAnon, VmHWM) and
`resource.getrusage(RUSAGE_SELF).ru_maxrss`. Writing "5" to `/proc/self/clear_refs`
resets the high-water mark behind both VmHWM and ru_maxrss (checked on this kernel), so a
worker can measure the peak of one phase (a training step) apart from an earlier one
(loading the model).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "
GB = 1e9
# replit-code-v1-3b's dimensions, for the benchmarks of the full-size random model.
FULL = {"n_layers": 32, "d_model": 2560, "n_heads": 32, "vocab": 32768}
GIB = float(1 << 30)


def ensure_repo_on_path() -> None:
    """Make `import model` work when the kit is neither installed nor on PYTHONPATH."""
    if importlib.util.find_spec("model") is None:
        sys.path.insert(0, str(REPO_ROOT))


# ----------------------------------------------------------------------------- memory


def proc_status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, RssAnon, RssFile, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no field {field}")


def rss_bytes() -> int:
    """Current resident set size (anonymous + file-backed + shmem)."""
    return proc_status_bytes("VmRSS")


def psutil_rss_bytes() -> int:
    """Current RSS as psutil reports it (from /proc/self/statm)."""
    import psutil

    return psutil.Process().memory_info().rss


def rss_anon_bytes() -> int:
    """Current anonymous resident memory: what the process itself allocated, not file pages."""
    return proc_status_bytes("RssAnon")


def ru_maxrss_bytes() -> int:
    """Peak RSS from `getrusage` (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (VmHWM and ru_maxrss); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so a later RSS reading is not inflated by it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Background thread that samples `probe()` every `interval` seconds and keeps the maximum.

    Use as a context manager; `peak` also includes one reading at start and one at exit.
    torch releases the GIL inside its kernels, so sampling continues during long ops.
    """

    def __init__(self, probe: Callable[[], int], interval: float = 0.02):
        self.probe = probe
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.probe())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class StepMemory:
    """The memory of training steps apart from the model's: the two step benchmarks' method.

    `settle(model)` reads every parameter once (fp32 weights still mapped from the
    checkpoint file are not resident until read, and must count as loaded, not as step
    memory), hands freed heap back, takes "RSS after load" and resets the high-water mark.
    Then `with memory: <steps>` samples RSS every 10 ms, and `figures()` gives the peak as
    max(ru_maxrss, VmHWM, sampled RSS) and the step memory as that peak minus "after load".
    """

    def settle(self, model: Any) -> None:
        import gc

        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        gc.collect()
        malloc_trim()
        self.rss_loaded = psutil_rss_bytes()
        self.rss_loaded_file = proc_status_bytes("RssFile")
        self.load_peak = ru_maxrss_bytes()
        self.reset_ok = reset_peak_rss()

    def __enter__(self) -> StepMemory:
        self._sampler = PeakSampler(psutil_rss_bytes, interval=0.01).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sampler.__exit__(*exc)
        self.peak_ru = ru_maxrss_bytes()
        self.peak_hwm = proc_status_bytes("VmHWM")

    def figures(self) -> dict[str, int | None]:
        sampled = self._sampler.peak
        peak = max(self.peak_ru, self.peak_hwm, sampled) if self.reset_ok else sampled
        return {
            "rss_loaded": self.rss_loaded,
            "rss_loaded_file": self.rss_loaded_file,
            "load_peak_rss": self.load_peak,
            "peak_ru_maxrss": self.peak_ru if self.reset_ok else None,
            "peak_vmhwm": self.peak_hwm if self.reset_ok else None,
            "peak_sampled": sampled,
            "peak_rss": peak,
            "process_peak_rss": max(peak, self.load_peak),
            "step_bytes": peak - self.rss_loaded,
        }


def quiet_torch_worker(flush_denormal: bool) -> None:
    """A step worker's set-up: the kit importable, transformers' bars and logs off."""
    ensure_repo_on_path()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_flush_denormal(flush_denormal)


def available_memory_bytes() -> int:
    """MemAvailable of the machine (what can be allocated without swapping or OOM)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("/proc/meminfo has no MemAvailable")


# ----------------------------------------------------------------------------- workers


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result for `run_worker` to pick up."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(
    script: str | Path,
    args: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `python script *args` in a fresh process and return its `RESULT` dict.

    `env` adds to this process's environment. On failure returns {"error": ...}: the exit
    status, the signal (SIGKILL from the kernel's OOM killer reads as "killed by signal
    9"), or the timeout.
    """
    env = os.environ | (env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result: dict[str, Any] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
        elif line.strip():
            print(f"  [worker] {line}", flush=True)
    if proc.returncode < 0:
        sig = -proc.returncode
        hint = " (likely the OOM killer)" if sig == 9 else ""
        return {"error": f"killed by signal {sig}{hint}"}
    if proc.returncode != 0 or result is None:
        return {"error": f"exit status {proc.returncode}, no result"}
    return result


# ----------------------------------------------------------------------------- output


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain left/right aligned text table (first column left, the rest right)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def speed_cells(r: dict[str, Any], length: int) -> list[str]:
    """A step worker's speed cells: median step s, tokens/s, best tok/s, tok/CPU-s."""
    step = median(r["times"])
    return [
        f"{step:.2f}",
        f"{length / step:.1f}",
        f"{length / min(r['times']):.1f}",
        f"{length / median(r['cpu_times']):.1f}",
    ]


def ratio_table(results: dict[tuple[str, int], dict], lengths: Sequence[int]) -> str:
    """Ours against the baseline per length, from step workers' results keyed (kind, length)."""
    rows = []
    for length in lengths:
        a, b = results["ours", length], results["baseline", length]
        if "error" in a or "error" in b:
            rows.append([str(length), *["-"] * 5])
            continue
        rows.append(
            [
                str(length),
                f"{median(b['times']) / median(a['times']):.2f}x",
                f"{min(b['times']) / min(a['times']):.2f}x",
                f"{median(b['cpu_times']) / median(a['cpu_times']):.2f}x",
                f"{a['step_bytes'] / b['step_bytes']:.3f}",
                f"{a['peak_rss'] / b['peak_rss']:.3f}",
            ]
        )
    headers = ["tokens", "tokens/s", "best tok/s", "tok/CPU-s", "step peak", "total peak RSS"]
    return format_table(headers, rows)


def gb(n: float | None) -> str:
    """Bytes as decimal GB with two decimals, or "-"."""
    return "-" if n is None else f"{n / GB:.2f}"


class Stopwatch:
    """`with Stopwatch() as t: ...; t.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_bytes(n_layers: int, d_model: int, vocab: int) -> int:
    """Size of the fp32 tensors of a checkpoint in the published layout (no biases, tied)."""
    per_block = 12 * d_model * d_model + 2 * d_model
    return 4 * (vocab * d_model + n_layers * per_block + d_model)


def checkpoint_is_complete(
    path: Path, *, n_layers: int, d_model: int, n_heads: int, vocab: int
) -> bool:
    """True if `path` holds a finished checkpoint of these dimensions.

    `prepare_checkpoint` writes under a temporary name and renames at the end, so a
    directory under the final name is complete; the checks guard against a directory
    someone else left there.
    """
    config_file, weights = path / "config.json", path / "pytorch_model.bin"
    if not (config_file.is_file() and weights.is_file()):
        return False
    config = json.loads(config_file.read_text())
    dims = (config.get("n_layers"), config.get("d_model"), config.get("n_heads"))
    if dims != (n_layers, d_model, n_heads) or config.get("vocab_size") != vocab:
        return False
    return weights.stat().st_size >= checkpoint_bytes(n_layers, d_model, vocab)


def prepare_checkpoint(
    path: str | Path,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    vocab: int = 32768,
    seed: int = 0,
) -> dict[str, Any]:
    """Reuse the random checkpoint at `path`, or write it in a subprocess (temp dir + rename).

    Returns {"reused": bool, "seconds": ..., "peak_rss": ...} or {"error": ...}; a
    directory at `path` that is not a checkpoint of these dimensions is an error, never
    overwritten.
    """
    path = Path(path)
    dims = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "vocab": vocab}
    if checkpoint_is_complete(path, **dims):
        return {"reused": True}
    if path.exists():
        return {"error": f"{path} exists but is not a complete checkpoint of {dims}; remove it"}
    args = ["write-checkpoint", str(path), json.dumps({**dims, "seed": seed})]
    return run_worker(Path(__file__), args)


def _write_checkpoint_worker(target: Path, spec: dict[str, int]) -> None:
    """Write under a temporary name, then rename; one writer at a time per target.

    An exclusive flock on `.<name>.lock` (released by the kernel if the writer dies)
    serializes writers: a second one waits, then reuses what the first wrote. Holding
    the lock, any `.<name>.partial-*` left over is from a dead writer and is removed.
    """
    import fcntl
    import shutil

    ensure_repo_on_path()
    from model.random_checkpoint import write_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    dims = {k: spec[k] for k in ("n_layers", "d_model", "n_heads", "vocab")}
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if checkpoint_is_complete(target, **dims):
            emit_result({"reused": True})
            return
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = target.parent / f".{target.name}.partial-{os.getpid()}"
        with Stopwatch() as t:
            write_checkpoint(partial, **spec)
        os.rename(partial, target)
    emit_result({"reused": False, "seconds": t.seconds, "peak_rss": ru_maxrss_bytes()})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "write-checkpoint":
        _write_checkpoint_worker(Path(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} write-checkpoint DIR JSON_SPEC (used by the benchmarks)")
