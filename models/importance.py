"""Measure which layers and experts matter, on calibration data, to order the elastic family.

Experts are ranked by routing mass (the gate probability summed over calibration tokens, softmax over all
of the layer's experts); layers by how much they change their input (mean 1 - cosine similarity between a
block's input and output, as ShortGPT's Block Influence). The orders go into the model (`set_importance`),
so the "n most important" sub-models keep what matters and extraction is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.moe import DecoderLayer, ElasticMoE, MoEBlock
from models.subnet import Importance


@dataclass(frozen=True)
class ImportanceScores:
    layer_influence: tuple[float, ...]  # per layer: mean 1 - cos(input, output); larger = more important
    expert_mass: tuple[tuple[float, ...], ...]  # per layer: mean gate probability per expert; () if dense

    def importance(self) -> Importance:
        """Orders from most to least important (ties keep the lower index first)."""

        def order(scores: tuple[float, ...]) -> tuple[int, ...]:
            return tuple(sorted(range(len(scores)), key=lambda i: (-scores[i], i)))

        return Importance(
            layer_order=order(self.layer_influence),
            expert_order=tuple(order(mass) for mass in self.expert_mass),
        )


@torch.no_grad()
def measure_importance(model: ElasticMoE, batches: Iterable[torch.Tensor]) -> ImportanceScores:
    """Run the full model on `batches` (each (B, T) token ids) and score every layer and expert."""
    n_layers = model.config.n_layers
    influence = [0.0] * n_layers
    mass: list[torch.Tensor | None] = [None] * n_layers
    tokens_seen = 0

    def layer_hook(index: int):
        def hook(_module: DecoderLayer, args: tuple, output: tuple) -> None:
            x_in, x_out = args[0].float(), output[0].float()
            influence[index] += float((1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum())

        return hook

    def router_hook(index: int):
        def hook(module: MoEBlock, args: tuple) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1]).float()
            probs = F.softmax(F.linear(hidden, module.gate.weight.float()), dim=-1).sum(dim=0)
            previous = mass[index]
            mass[index] = probs if previous is None else previous + probs

        return hook

    handles = []
    for index, layer in enumerate(model.layers):
        handles.append(layer.register_forward_hook(layer_hook(index)))
        if isinstance(layer.mlp, MoEBlock):
            handles.append(layer.mlp.register_forward_pre_hook(router_hook(index)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
            tokens_seen += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens_seen == 0:
        raise ValueError("batches: no calibration tokens given")
    return ImportanceScores(
        layer_influence=tuple(v / tokens_seen for v in influence),
        expert_mass=tuple(tuple((m / tokens_seen).tolist()) if m is not None else () for m in mass),
    )
