"""bench/gpu.py, the one device call that measures issue 10's figures, runs end to end.

A GPU is lent rarely and for minutes: a script that fails there wastes the loan. This runs
every default section on the 2-layer model (CPU here), with one step per measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_runs_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(out)]
    command += ["--warmup", "0", "--repeats", "1", "--ladder", "512", "1024"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    sections = ["matmul", "micro", "baseline", "agreement", "levers", "ladder"]
    assert {s: report[f"{s}_status"] for s in sections} == dict.fromkeys(sections, "done")
    assert set(report["micro"]) == {"1x256", "4x256", "1x1024"}
    assert all(r["step_s"] > 0 and len(r["losses"]) == 1 for r in report["micro"].values())
    assert all("step_s" in report["baseline"][s] for s in ("1x256", "4x256"))
    assert all(row["agrees"] for row in report["agreement"].values())

    levers = report["levers"]
    measured = {k for k in levers if "@" in k and not k.startswith("before@")}
    names = {k.split("@")[0] for k in measured}
    assert names == {
        "sdpa",
        "no_ckpt",
        "bf16_blocks",
        "bf16_residual",
        "fused_lora",
        "fused_lora_w",
        "keep_attn",
        "compile",
    }
    assert all("agrees" in levers[k] for k in measured), levers
    # These change no arithmetic on CPU, only what is kept or how it runs: equal losses.
    same = [k for k in measured if k.split("@")[0] in ("no_ckpt", "keep_attn")]
    assert all(levers[k]["max_dloss"] < 1e-5 for k in same), {k: levers[k] for k in same}
    assert set(levers["best"]) == {"1x256", "4x256", "1x1024"}

    ladder = report["ladder"]
    assert ladder["longest"] == {"plain": 1024, "offload": 1024}
    assert ladder["offload@1024"]["agrees"] and ladder["offload@1024"]["max_dloss"] == 0
