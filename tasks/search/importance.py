"""Importance calibration: rank the supernet's experts and layers on training batches before the search.

The search cuts "the n most important" layers and experts, so the order must be measured first: routing mass (or
REAP saliency) for experts, block influence for layers, on a few calibration batches of the training split. A
nested dimension keeps the order it was trained in. The orders are stored in the supernet, and the smallest
sub-model of the space is scored with the measured order and with the identity order, so every run shows what the
ranking bought.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.importance import ImportanceScores, measure_importance
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, Importance, SubnetSpec
from tasks.data.corpus import PreparedData
from tasks.pretrain.validation_panel import evaluate_panel
from tasks.search.config import ImportanceConfig


@dataclass(frozen=True)
class RankingEffect:
    """Validation loss of the same-size sub-model with measured importance order vs identity order."""

    spec_importance: SubnetSpec
    spec_identity: SubnetSpec
    loss_importance: float
    loss_identity: float


@torch.no_grad()
def rank_importance(
    model: ElasticMoE, data: PreparedData, config: ImportanceConfig, space: ElasticSpace, seq_len: int
) -> tuple[ImportanceScores, RankingEffect]:
    """Measure importance on calibration batches, store the orders in `model` (a nested dimension keeps the order
    it was trained in), and show their effect on the smallest sub-model of the space."""
    rng = np.random.default_rng(config.seed)
    device = next(model.parameters()).device
    mix = data.training_mix()
    batches = [mix.sample(config.batch_size, seq_len, rng).to(device) for _ in range(config.calibration_batches)]
    scores = measure_importance(model, batches, space.expert_ranking)
    identity = Importance.identity(model.config)
    measured = space.trained_order(model.importance(), scores.importance())
    smallest_identity = space.smallest(model.config, identity)
    smallest_measured = space.smallest(model.config, measured)
    model.set_importance(measured)
    losses = evaluate_panel(
        model,
        {"importance": smallest_measured, "identity": smallest_identity},
        data.split("val"),
        config.batch_size,
        seq_len,
        config.eval_batches,
        device,
    )
    return scores, RankingEffect(smallest_measured, smallest_identity, losses["importance"], losses["identity"])
