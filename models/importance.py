"""Measure which layers and experts matter, on calibration data, to order the elastic family.

Experts are ranked by routing mass (the gate probability averaged over calibration tokens, softmax over all
of the layer's experts) or by REAP's router-weighted activation saliency (the mean, over the tokens routed to
an expert, of its gate weight times the norm of its output: an expert that is often chosen but adds little
ranks low); layers by how much they change their input (mean 1 - cosine similarity between a
block's input and output, as ShortGPT's Block Influence). The orders go into the model (`set_importance`),
so the "n most important" sub-models keep what matters and extraction is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.moe import DecoderLayer, ElasticMoE, MoEBlock, route_top_k, swiglu
from models.subnet import ExpertRanking, Importance


@dataclass(frozen=True)
class ImportanceScores:
    layer_influence: tuple[float, ...]  # per layer: mean 1 - cos(input, output); larger = more important
    expert_mass: tuple[tuple[float, ...], ...]  # per layer: the expert score (see measure_importance); () if dense

    def importance(self) -> Importance:
        """Orders from most to least important (ties keep the lower index first)."""

        def order(scores: tuple[float, ...]) -> tuple[int, ...]:
            return tuple(sorted(range(len(scores)), key=lambda i: (-scores[i], i)))

        return Importance(
            layer_order=order(self.layer_influence),
            expert_order=tuple(order(mass) for mass in self.expert_mass),
        )


def reap_saliency(
    block: MoEBlock, hidden: torch.Tensor, is_image: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert of `block` on hidden states (N, D): the sum over routed tokens of gate weight x ||expert
    output|| (REAP, arXiv 2510.13999), and the number of tokens routed to it (within each token's pool when
    routing is heterogeneous: `is_image` (N,))."""
    gate = block.gate
    mask = block.routing_mask(is_image)
    _, weights, chosen = route_top_k(
        hidden, gate.weight, gate.e_score_correction_bias, block.top_k, block.norm_min, mask
    )
    n = block.n_experts
    total, count = torch.zeros(n, device=hidden.device), torch.zeros(n, device=hidden.device)
    for expert in range(n):
        token, slot = (chosen == expert).nonzero(as_tuple=True)
        if token.numel():
            out = swiglu(hidden[token], block.experts.gate_up_proj[expert], block.experts.down_proj[expert])
            total[expert] = (weights[token, slot] * out.float().norm(dim=-1)).sum()
            count[expert] = token.numel()
    return total, count


@torch.no_grad()
def measure_importance(
    model: ElasticMoE, batches: Iterable[torch.Tensor], expert_ranking: ExpertRanking = "routing_mass"
) -> ImportanceScores:
    """Run the full model on `batches` (each (B, T) token ids) and score every layer and expert.

    `routing_mass`: an expert's score is its mean gate probability over all tokens (they sum to 1 per layer);
    `reap`: its mean gate weight x output norm over the tokens routed to it (0 for an expert never chosen).
    With heterogeneous routing each token's probabilities and choices stay in its pool, so experts are ranked
    against the others of their pool (a sub-model keeps the best of each).
    """
    n_layers = model.config.n_layers
    influence = [0.0] * n_layers
    mass: list[torch.Tensor | None] = [None] * n_layers
    routed: list[torch.Tensor | None] = [None] * n_layers
    tokens_seen = 0

    def layer_hook(index: int):
        def hook(_module: DecoderLayer, args: tuple, output: tuple) -> None:
            x_in, x_out = args[0].float(), output[0].float()
            influence[index] += float((1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum())

        return hook

    def router_hook(index: int):
        def hook(module: MoEBlock, args: tuple) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            is_image = args[3].reshape(-1) if len(args) > 3 and args[3] is not None else None  # MoEBlock.forward
            if expert_ranking == "reap":
                score, count = reap_saliency(module, hidden, is_image)
                seen = routed[index]
                routed[index] = count if seen is None else seen + count
            else:
                logits = F.linear(hidden.float(), module.gate.weight.float())
                mask = module.routing_mask(is_image)
                score = F.softmax(logits if mask is None else logits + mask, dim=-1).sum(dim=0)
            previous = mass[index]
            mass[index] = score if previous is None else previous + score

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

    def mean(index: int) -> tuple[float, ...]:
        total = mass[index]
        if total is None:
            return ()
        count = routed[index]
        return tuple((total / (count.clamp(min=1) if count is not None else tokens_seen)).tolist())

    return ImportanceScores(
        layer_influence=tuple(v / tokens_seen for v in influence),
        expert_mass=tuple(mean(i) for i in range(n_layers)),
    )
