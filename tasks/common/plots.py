"""PNG pictures for MLflow: loss curves of the sub-model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

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


def plot_modality_heatmap(
    image_fraction: Sequence[Sequence[float | None]],
    layers: Sequence[int],
    path: Path,
    title: str,
    image_token_share: float,
) -> Path:
    """Per layer and expert, the share of the expert's routed tokens that are image tokens: blue experts serve text,
    red ones images, and an agnostic router colours every cell near the batch's image share (the colour bar's tick).
    Unused experts are black."""
    values = np.array([[np.nan if v is None else v for v in row] for row in image_fraction], dtype=float)
    cmap = plt.get_cmap("coolwarm").copy()
    cmap.set_bad("black")  # not the map's middle grey, which means "half images"
    fig, ax = plt.subplots(figsize=(0.55 * values.shape[1] + 3, 0.5 * len(values) + 2), dpi=100)
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0)
    bar = fig.colorbar(image, ax=ax, label="image share of the expert's tokens")
    bar.set_ticks(sorted({0.0, 0.5, 1.0, round(image_token_share, 2)}))
    for (row, column), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(len(values)), [str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    return _write(fig, path)


def plot_claim(runs: Sequence[Mapping], recipe: str, path: Path) -> Path:
    """The train-once claim for one recipe at a glance (runs as benchmarks/train_once.py stores them): validation
    loss against training FLOPs. The full model and each member's twin trained alone are learning curves (the first
    seed's, ending at the mean over seeds); the family cut from the elastic run and distilled is a column of points at
    what the whole family cost; a dashed line marks what training the five models separately costs."""
    mine = sorted((r for r in runs if r["recipe"] == recipe), key=lambda r: r["seed"])
    first, n = mine[0], len(mine)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def mean(get) -> float:
        return sum(get(r) for r in mine) / n

    def curve(points: Sequence, flops: float, final: float, label: str, colour: str) -> None:
        last = max(s for s, _ in points)
        xs = [s / last * flops for s, _ in points]
        ys = [v for _, v in points][:-1] + [final]  # the in-run validation, ending at the benchmark's figure
        ax.plot(xs, ys, color=colour, label=label, lw=1.4)
        ax.hlines(final, flops, family_cost, color=colour, linestyle=":", lw=1)  # carried over to the family's column

    family_cost = mean(
        lambda r: r["rows"]["elastic"]["flops"] + sum(m["distill_flops"] for m in r["rows"]["members"].values())
    )
    full = first["rows"]["full_alone"]
    curve(full["curve"], full["flops"], mean(lambda r: r["rows"]["full_alone"]["val"]), "full model alone", "black")
    members = list(first["rows"]["members"].items())
    for i, (label, m) in enumerate(members):
        twin = mean(lambda r, label=label: r["rows"]["members"][label]["twin"])
        curve(m["twin_curve"], m["twin_flops"], twin, f"{m['spec']} alone ({label})", colours[i % len(colours)])
    separate = full["flops"] + sum(m["twin_flops"] for _, m in members)
    ax.scatter(
        [family_cost],
        [mean(lambda r: r["rows"]["elastic"]["val"])],
        color="black",
        s=70,
        zorder=5,
        label=f"family `{recipe}`: full model and members (cut + distilled)",
    )
    for i, (label, _) in enumerate(members):
        value = mean(lambda r, label=label: r["rows"]["members"][label]["distilled"])
        ax.scatter([family_cost], [value], color=colours[i % len(colours)], s=70, zorder=5, edgecolors="black")
    ax.axvline(separate, color="0.5", linestyle="--", lw=1, label="cost of training the five separately")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log): each model's own; the whole family's for the points")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(
        f"Train once: the family cut from one run vs each model trained alone\n`{recipe}`, {n} "
        f"seed{'s' if n > 1 else ''}, {first['tokens']:,} tokens each",
        fontsize=10,
    )
    finals = [m["twin"] for _, m in members] + [full["val"]]
    ax.set_ylim(min(finals) - 0.15, max(finals) + 0.5)
    return _save(fig, ax, path)


def plot_grpo(metrics: Sequence[Mapping[str, float]], held_out: Sequence[Mapping[str, float]], path: Path) -> Path:
    """GRPO's training reward and useful-group fraction per step, and held-out exact match over steps."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    steps = range(1, len(metrics) + 1)
    ax.plot(steps, [m["reward_mean"] for m in metrics], color="0.6", linewidth=1, label="train reward (mean)")
    ax.plot(steps, [m["useful_groups"] for m in metrics], color="0.8", linewidth=1, label="groups with spread")
    measured = [h["step"] for h in held_out]
    ax.plot(measured, [h["exact_match/overall"] for h in held_out], marker="o", label="held-out exact match (greedy)")
    ax.plot(measured, [h["pass_at_k"] for h in held_out], marker="s", label="held-out pass@k (sampled)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("fraction")
    ax.set_title("GRPO on verifiable rewards")
    return _save(fig, ax, path)
