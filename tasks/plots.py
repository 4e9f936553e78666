"""PNG pictures for MLflow: loss curves of the sub-model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _write(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _save(fig, ax, path: Path) -> Path:
    """Grid and legend for line/scatter plots, then write."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _write(fig, path)


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
    return _save(fig, ax, path)


def plot_pareto(
    points: Sequence[tuple[int, float]], front: Sequence[tuple[int, float]], chosen: tuple[int, float], path: Path
) -> Path:
    """Validation loss against active parameters of every evaluated sub-model, the front, the chosen one."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if points:
        ax.scatter(*zip(*points, strict=True), s=14, color="0.6", label="evaluated sub-models")
    if front:
        ax.plot(*zip(*front, strict=True), color="tab:blue", marker="o", label="Pareto front")
    ax.scatter([chosen[0]], [chosen[1]], s=160, marker="*", color="tab:red", zorder=5, label="chosen")
    ax.set_xlabel("active parameters per token")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Sub-model search under budgets")
    return _save(fig, ax, path)


def plot_routing_heatmap(load: Sequence[Sequence[float]], path: Path, title: str) -> Path:
    """Per-layer expert load (fraction of routed tokens) as a heatmap: balanced routing is a flat colour."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(load) + 2), dpi=100)
    image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="fraction of routed tokens")
    ax.set_xticks(range(len(load[0])) if load else [])
    ax.set_yticks(range(len(load)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    return _write(fig, path)


def plot_claim(runs: Sequence[Mapping], path: Path) -> Path:
    """The train-once claim at a glance (runs as benchmarks/train_once.py stores them): validation loss against
    training FLOPs. Each member's twin trained alone is a learning curve (seed 0 or the first seed); the family's
    members (cut from the elastic run and distilled) are points at what the whole family cost, one marker per
    recipe, averaged over its seeds."""
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    first = min(runs, key=lambda r: r["seed"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def curve(points: Sequence, flops: float, label: str, colour: str) -> None:
        last = max(s for s, _ in points)
        ax.plot([s / last * flops for s, _ in points], [v for _, v in points], color=colour, label=label, lw=1.4)

    members = list(first["rows"]["members"].items())
    curve(first["rows"]["full_alone"]["curve"], first["rows"]["full_alone"]["flops"], "full model alone", "black")
    for i, (label, m) in enumerate(members):
        curve(m["twin_curve"], m["twin_flops"], f"twin: {m['spec']} ({label})", colours[i % len(colours)])
    markers = "o^sDvP*X"
    for j, recipe in enumerate(sorted({r["recipe"] for r in runs})):
        mine = [r for r in runs if r["recipe"] == recipe]
        cost = sum(r["rows"]["elastic"]["flops"] + sum(m["distill_flops"] for m in r["rows"]["members"].values())
                   for r in mine) / len(mine)  # fmt: skip
        marker = markers[j % len(markers)]
        full = sum(r["rows"]["elastic"]["val"] for r in mine) / len(mine)
        ax.scatter([cost], [full], marker=marker, color="black", s=60, zorder=5, label=f"family `{recipe}`")
        for i, (label, _) in enumerate(members):
            value = sum(r["rows"]["members"][label]["distilled"] for r in mine) / len(mine)
            ax.scatter([cost], [value], marker=marker, color=colours[i % len(colours)], s=60, zorder=5,
                       edgecolors="black")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log): a twin's own; the whole family's for its points")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Train once: family members (points) vs the same architectures trained alone (lines), "
                 f"{first['tokens']:,} tokens", fontsize=10)  # fmt: skip
    final = [m["twin"] for _, m in members] + [first["rows"]["full_alone"]["val"]]
    ax.set_ylim(min(final) - 0.15, max(final) + 0.6)
    return _save(fig, ax, path)
