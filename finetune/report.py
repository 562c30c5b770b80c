"""A finished run's metrics.json and loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.run_folder import write_json


def write_report(
    metrics: Path, plot: Path, history: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """`metrics` (summary + Trainer's log history as JSON) and `plot` (train and eval loss)."""
    write_json(metrics, {"summary": summary, "history": history})
    plot_loss(history, plot)


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
