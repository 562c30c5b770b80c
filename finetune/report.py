"""A finished run's metrics.json and loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """metrics.json (summary + Trainer's log history) and loss.png (train and eval loss)."""
    (out / "metrics.json").write_text(
        json.dumps({"summary": summary, "history": history}, indent=2)
    )
    plot_loss(history, out / "loss.png")


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
