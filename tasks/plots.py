"""PNG pictures for MLflow: loss curves of the sub-model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(
    train: Sequence[tuple[int, float]], val: Mapping[str, Sequence[tuple[int, float]]], path: Path
) -> Path:
    """Training loss of the full model and validation loss of each panel sub-model against the step."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), color="0.7", linewidth=1, label="train (full model)")
    for label, points in val.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=f"val {label}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Elastic pre-training: the whole sub-model family learns")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
