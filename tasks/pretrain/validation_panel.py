"""The validation panel: a fixed set of sub-models (full, largest, smallest and some in between) whose validation
losses pre-training logs as learning curves, which the search and extraction stages reuse to score sub-models on
the same batches, with the routing metrics logged beside them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from models.accounting import subnet_cost
from models.losses import causal_lm_loss
from models.moe import ElasticMoE, RoutingStats
from models.publish import staged_file
from models.subnet import SubnetSpec
from tasks.data.sampling import sample_batch
from tasks.pretrain.config import PretrainConfig

# The validation windows every stage scores on come from one fixed seed, whatever the run's own seed: the same
# batches for every sub-model, stage and run, so their losses compare pairwise.
VALIDATION_SEED = 12345


def evaluation_panel(config: PretrainConfig, model: ElasticMoE) -> dict[str, SubnetSpec | None]:
    """The fixed sub-models validated during training: full, largest, smallest and a few in between."""
    importance = model.importance()
    members = sorted(
        config.elastic.enumerate(model.config, importance),
        key=lambda s: (subnet_cost(model.config, s).active_params, s.describe()),
    )
    picks = [members[0]]
    if config.eval_panel_size and len(members) > 2:
        positions = np.linspace(0, len(members) - 1, config.eval_panel_size + 2)[1:-1]
        picks += [members[int(round(p))] for p in positions]
    picks.append(config.elastic.largest(model.config, importance))
    panel: dict[str, SubnetSpec | None] = {"full": None}
    for spec in picks:
        if spec != SubnetSpec.full(model.config):
            panel.setdefault(spec.describe(), spec)
    return panel


@torch.no_grad()
def evaluate_panel(
    model: ElasticMoE,
    panel: dict[str, SubnetSpec | None],
    val_tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean validation LM loss of each sub-model in `panel`, all on the same fixed batches."""
    per_batch = panel_batch_losses(model, panel, val_tokens, batch_size, seq_len, n_batches, device)
    return {label: sum(losses) / len(losses) for label, losses in per_batch.items()}


@torch.no_grad()
def panel_batch_losses(
    model: ElasticMoE,
    panel: dict[str, SubnetSpec | None],
    val_tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Each sub-model's validation LM loss on each of the same fixed batches: differences between members are
    paired, so their noise is the spread of the per-batch differences."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(VALIDATION_SEED)
    batches = [sample_batch(val_tokens, batch_size, seq_len, rng).to(device) for _ in range(n_batches)]
    losses = {
        label: [causal_lm_loss(model(b, subnet=spec).logits, b).item() for b in batches]
        for label, spec in panel.items()
    }
    model.train(was_training)
    return losses


def routing_entropy(routing: list[RoutingStats]) -> float:
    """Mean normalised routing entropy NE = -sum p log p / log N over layers (1.0 = perfectly balanced)."""
    values = []
    for stats in routing:
        load = stats.expert_load[stats.kept]
        n = load.numel()
        if n > 1:
            p = load.clamp_min(1e-12)
            values.append(float(-(p * p.log()).sum() / math.log(n)))
    return sum(values) / len(values) if values else 1.0


@torch.no_grad()
def full_model_routing(
    model: ElasticMoE, val_tokens: np.ndarray, config: PretrainConfig, device: torch.device
) -> list[list[float]]:
    """Expert load per MoE layer of the full model on one fixed validation batch (rows of the heatmap)."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(VALIDATION_SEED)
    batch = sample_batch(val_tokens, config.batch_size, config.seq_len, rng).to(device)
    rows = [stats.expert_load.tolist() for stats in model(batch).routing]
    model.train(was_training)
    return rows


def _parsed(line: str) -> dict | None:
    """A history line's record, or None for a line a kill cut short."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def metric_key(label: str, metric: str = "val_loss") -> str:
    return f"{metric}/" + label.replace(" ", "_")


class MetricsHistory:
    """Append-only jsonl of logged points that survives kills; truncated to the resumed step on restart.

    One process writes it (the main one). A kill can tear the line being appended: a line that does not parse is
    dropped on restart, and the truncated history replaces the file atomically, so a kill then loses nothing."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        self.records = [r for r in map(_parsed, lines) if r is not None and r["step"] <= resume_step]
        with staged_file(path) as staged:
            staged.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def curves(self) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
        train = [(r["step"], r["train/loss_full"]) for r in self.records if "train/loss_full" in r]
        val: dict[str, list[tuple[int, float]]] = {}
        for r in self.records:
            for key, value in r.items():
                if key.startswith("val_loss/"):
                    val.setdefault(key.removeprefix("val_loss/"), []).append((r["step"], value))
        return train, val
