"""Which experts serve which modality: ERNIE 5.0's routing is modality-agnostic (one expert pool shared by text and
image tokens, the router never told a token's modality), and its report shows that experts nonetheless specialise.
This module measures that on a fixed mixed validation batch: per layer and expert, how many of its routed
(token, slot) pairs came from text and from image tokens, and one figure for the whole model, its mean modality
purity.

An image token is one of the codebook's codes; the `<image>` and `</image>` markers count as text (the text decides
to open an image and closes it).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from models.moe import ElasticMoE, RoutingStats, image_mask
from tasks.data.sampling import TrainingMix
from tasks.pretrain.validation_panel import VALIDATION_SEED


class ModalityRouting(BaseModel):
    """The full model's routing split by modality, one row per MoE layer (JSON-ready: it travels in stage results)."""

    model_config = ConfigDict(frozen=True)

    layers: list[int]  # the MoE layers, in order
    text_pairs: list[list[int]]  # [layer][expert]: (token, slot) pairs from text tokens
    image_pairs: list[list[int]]  # [layer][expert]: (token, slot) pairs from image tokens
    image_fraction: list[list[float | None]]  # [layer][expert]: image share of the expert's load (None: unused)
    purity: list[float]  # per layer, see `modality_purity`
    mean_purity: float  # over the MoE layers: 0.5 agnostic .. 1.0 every expert serves one modality
    image_token_share: float  # image tokens among the batch's tokens


def modality_counts(assignments: torch.Tensor, is_image: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(2, E) routed (token, slot) pairs per expert from text (row 0) and image (row 1) tokens.

    `assignments` (T, k) holds each token's experts, `is_image` (T,) its modality."""
    experts = assignments.reshape(len(is_image), -1)
    image = is_image[:, None].expand_as(experts)
    return torch.stack(
        [
            torch.bincount(experts[~image], minlength=n_experts),
            torch.bincount(experts[image], minlength=n_experts),
        ]
    )


def modality_purity(counts: torch.Tensor) -> float:
    """How much one layer's experts specialise by modality, independent of how many tokens each modality has.

    Each modality's pairs are normalised by its total (a_e = image pairs of e / all image pairs, b_e likewise for
    text); expert e's purity is max(p, 1 - p) with p = a_e / (a_e + b_e), and the layer's is the average over experts
    weighted by (a_e + b_e) / 2. It is 0.5 when every expert takes both modalities in proportion to their totals
    (agnostic) and 1.0 when each expert takes one modality only. A layer that saw one modality only is 0.5."""
    text, image = counts[0].double(), counts[1].double()
    if text.sum() == 0 or image.sum() == 0:
        return 0.5
    a, b = image / image.sum(), text / text.sum()
    used = (a + b) > 0
    share = a[used] / (a[used] + b[used])
    return float((((a + b)[used] / 2) * torch.maximum(share, 1 - share)).sum())


def modality_metrics(routing: ModalityRouting) -> dict[str, float]:
    """The purity figures as MLflow metrics: the model's mean and each MoE layer's."""
    layers = zip(routing.layers, routing.purity, strict=True)
    per_layer = {f"routing/modality_purity_layer_{layer}": purity for layer, purity in layers}
    return {"routing/mean_modality_purity": routing.mean_purity, **per_layer}


@torch.no_grad()
def measure_modality_routing(
    model: ElasticMoE, validation: TrainingMix, image_tokens: tuple[int, int], batch_size: int, seq_len: int
) -> ModalityRouting:
    """The full model's routing on one fixed validation batch drawn as training draws (text and image rows at the
    data's share), split by modality."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = validation.sample(batch_size, seq_len, np.random.default_rng(VALIDATION_SEED)).to(device)
    is_image = image_mask(batch.reshape(-1), *image_tokens)
    routing: tuple[RoutingStats, ...] = model(batch).routing
    model.train(was_training)
    counts = [modality_counts(stats.assignments, is_image, len(stats.expert_load)) for stats in routing]
    purity = [modality_purity(c) for c in counts]
    return ModalityRouting(
        layers=[stats.layer for stats in routing],
        text_pairs=[c[0].tolist() for c in counts],
        image_pairs=[c[1].tolist() for c in counts],
        image_fraction=[
            [float(i) / float(t + i) if t + i else None for t, i in zip(c[0].tolist(), c[1].tolist(), strict=True)]
            for c in counts
        ],
        purity=purity,
        mean_purity=sum(purity) / len(purity) if purity else 0.5,
        image_token_share=float(is_image.float().mean()),
    )
