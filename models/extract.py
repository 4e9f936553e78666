"""Extraction: cut a standalone smaller model out of the supernet.

The extracted model is an `ElasticMoE` with its own, smaller config (fewer layers, fewer experts per layer,
a sliced router and its smaller top-k) whose outputs equal `supernet(x, subnet=spec)`.
"""

from __future__ import annotations

import torch

from models.config import MoEConfig
from models.moe import ElasticMoE
from models.subnet import Importance, SubnetSpec


def subnet_config(config: MoEConfig, spec: SubnetSpec) -> MoEConfig:
    """The config of the standalone model that `spec` names."""
    spec.check_fits(config)
    # Dense layers are a leading block of the supernet, so the kept ones lead the extracted model too.
    n_dense = sum(1 for layer in spec.layers if not config.is_moe_layer(layer))
    counts = tuple(len(kept) for kept in spec.experts)
    moe_counts = counts[n_dense:]
    uniform = len(set(moe_counts)) <= 1
    return config.model_copy(
        update={
            "n_layers": len(spec.layers),
            "first_dense_layers": n_dense,
            "n_experts": moe_counts[0] if moe_counts else config.n_experts,
            "layer_n_experts": None if uniform else counts,
            "top_k": spec.top_k,
            "n_image_experts": _kept_image_experts(config, spec),
        }
    )


def _kept_image_experts(config: MoEConfig, spec: SubnetSpec) -> int:
    """How many image-pool experts every kept MoE layer keeps (heterogeneous routing; 0 for shared). Kept experts
    are renumbered in ascending order and the image pool is the last, so it stays the last n of every layer; the
    config holds one n for all layers, so the count must be the same in each."""
    if config.routing == "shared":
        return 0
    counts = {
        layer: sum(1 for e in kept if e in config.expert_pools(layer)[1])
        for layer, kept in zip(spec.layers, spec.experts, strict=True)
        if config.is_moe_layer(layer)
    }
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"experts: the kept layers keep {counts} image experts; a heterogeneous model keeps the same number "
            "in every MoE layer"
        )
    return next(iter(counts.values()), config.n_image_experts)


def _sub_importance(importance: Importance, spec: SubnetSpec) -> Importance:
    """The supernet's orders restricted to what `spec` keeps, renumbered for the extracted model."""
    new_layer = {old: new for new, old in enumerate(spec.layers)}
    expert_orders = []
    for layer, kept in zip(spec.layers, spec.experts, strict=True):
        new_expert = {old: new for new, old in enumerate(kept)}
        expert_orders.append(tuple(new_expert[e] for e in importance.expert_order[layer] if e in new_expert))
    return Importance(
        layer_order=tuple(new_layer[i] for i in importance.layer_order if i in new_layer),
        expert_order=tuple(expert_orders),
    )


# Tensors whose first axis is the routed expert: sliced to the kept experts.
_PER_EXPERT = (
    "mlp.gate.weight",
    "mlp.gate.e_score_correction_bias",
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
)


@torch.no_grad()
def extract_subnet(model: ElasticMoE, spec: SubnetSpec) -> ElasticMoE:
    """A standalone model computing exactly `model(x, subnet=spec)`, with weights copied from `model`."""
    config = subnet_config(model.config, spec)
    source = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        if name in source:
            state[name] = source[name].clone()
    for new, (old, kept) in enumerate(zip(spec.layers, spec.experts, strict=True)):
        prefix_old, prefix_new = f"layers.{old}.", f"layers.{new}."
        index = torch.tensor(kept, dtype=torch.long)
        for name, tensor in source.items():
            if not name.startswith(prefix_old):
                continue
            local = name[len(prefix_old) :]
            if local in _PER_EXPERT:
                tensor = tensor.index_select(0, index.to(tensor.device))
            elif local == "mlp.expert_order":
                continue  # rebuilt below from the renumbered importance
            state[prefix_new + local] = tensor.clone()
    importance = _sub_importance(model.importance(), spec)
    for layer, order in enumerate(importance.expert_order):
        if order:
            state[f"layers.{layer}.mlp.expert_order"] = torch.tensor(order)
    state["layer_order"] = torch.tensor(importance.layer_order)
    sub = ElasticMoE(config).to(next(model.parameters()).device)
    sub.load_state_dict(state, strict=True)
    return sub
