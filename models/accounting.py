"""Exact parameter and FLOP accounting for the supernet and any sub-model, from shapes alone.

Search budgets (total / active parameters) and MFU are computed from these numbers, so a test checks that
they equal the parameter count of the extracted model.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import MoEConfig
from models.subnet import SubnetSpec


@dataclass(frozen=True)
class ModelCost:
    """Size and per-token compute of one (sub-)model."""

    total_params: int  # every parameter the (extracted) model holds
    active_params: int  # parameters one token touches: total minus the routed experts it is not sent to
    forward_flops_per_token: int  # 2 per multiply-add of every matmul, plus attention scores/values


def _attention_params(config: MoEConfig) -> int:
    hd, d = config.attn_head_dim, config.d_model
    return 2 * d * config.n_heads * hd + 2 * d * config.n_kv_heads * hd


def subnet_cost(config: MoEConfig, spec: SubnetSpec | None = None, seq_len: int | None = None) -> ModelCost:
    """Cost of the sub-model `spec` of `config` (the full model when None).

    FLOPs follow PaLM's accounting: 2 x active matmul parameters (embedding lookup excluded, output
    projection included) + 4 x layers x context x attention width for QK^T and AV, with the context taken
    as `seq_len` (default `max_seq_len`).
    """
    spec = spec or SubnetSpec.full(config)
    spec.check_fits(config)
    d, ctx = config.d_model, seq_len or config.max_seq_len
    expert = 3 * d * config.expert_ffn_dim
    shared = 3 * d * config.expert_ffn_dim * config.n_shared_experts
    embed = config.vocab_size * d
    head = 0 if config.tie_embeddings else config.vocab_size * d

    total = embed + head + d  # embeddings, output projection, final norm
    active = total
    matmul_active = config.vocab_size * d  # the output projection always runs
    for layer, kept in zip(spec.layers, spec.experts, strict=True):
        common = _attention_params(config) + 2 * d  # attention + two norms
        if config.is_moe_layer(layer):
            router = len(kept) * d
            total_ffn = router + len(kept) * expert + shared
            active_ffn = router + spec.top_k * expert + shared
        else:
            total_ffn = active_ffn = 3 * d * config.dense_ffn_dim
        total += common + total_ffn
        active += common + active_ffn
        matmul_active += _attention_params(config) + active_ffn
    attention_flops = 4 * len(spec.layers) * ctx * config.n_heads * config.attn_head_dim
    return ModelCost(total, active, 2 * matmul_active + attention_flops)
