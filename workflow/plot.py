"""The loss curve of a run as a PNG, from the losses rank 0 records in the run's progress file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(progress: dict[str, Any], out: Path, *, title: str) -> Path:
    """Train loss per step and eval loss per eval pass on one chart (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = progress.get("losses") or []
    evals = progress.get("eval_losses") or []
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
