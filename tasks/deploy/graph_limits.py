"""What the fused ONNX graph (tasks/deploy/fused_graph.py) can express, and the weight quantization of each deploy
variant, decided from the configs alone: the pipeline config refuses an unexpressible shape when it is validated,
before any training, and this module imports neither onnx nor onnxruntime, so validating a config stays as cheap as
it was."""

from __future__ import annotations

from dataclasses import dataclass

from models.config import MoEConfig
from tasks.deploy.config import DeployConfig, Variant


class UnsupportedGraph(ValueError):
    """The model's shape cannot be expressed with the fused operators (the message names the blocking field)."""


@dataclass(frozen=True)
class WeightQuant:
    """Weight-only block quantization of every large matrix (the router and the norms stay fp32)."""

    bits: int  # q|k|v, o_proj, experts, shared experts and dense layers: 2, 4 or 8
    head_bits: int  # the output projection, and a tied embedding that reads the same bytes
    block_size: int  # weights per block along the input dimension (a power of two, at least 16)
    accuracy_level: int  # MatMulNBits / QMoE compute type: 0 = fp32 activations, 4 = int8 activations


_VARIANT_BITS = {"int8": 8, "int4": 4, "int2": 2}


def variant_quant(variant: Variant, config: DeployConfig) -> WeightQuant | None:
    """The weight quantization of a deploy variant (None: fp32). INT8 keeps an 8-bit head; INT4 and INT2 use
    `int4_output_bits` for it."""
    if variant == "fp32":
        return None
    bits = _VARIANT_BITS[variant]
    return WeightQuant(
        bits=bits,
        head_bits=8 if bits == 8 else config.int4_output_bits,
        block_size=config.int4_block_size,
        accuracy_level=config.int4_accuracy_level,
    )


def fused_graph_blockers(config: MoEConfig, quant: WeightQuant | None) -> list[str]:
    """Why `config` cannot become a fused graph (empty: it can), each reason naming the field that blocks it."""
    blockers = []
    hd = config.attn_head_dim
    if hd % 8:
        blockers.append(
            f"pretrain.model.head_dim={hd} (d_model / n_heads unless set) is not a multiple of 8, which onnxruntime's "
            "GroupQueryAttention requires"
        )
    if config.n_heads % config.n_kv_heads:
        blockers.append(f"pretrain.model.n_kv_heads={config.n_kv_heads} must divide n_heads={config.n_heads}")
    if config.routing == "heterogeneous":
        blockers.append(
            "pretrain.model.routing=heterogeneous: onnxruntime's MoE operator routes every token among all of a "
            "layer's experts, with no per-token pool"
        )
    if quant is not None:
        inputs = {
            "d_model": config.d_model,
            "n_heads * head_dim": config.n_heads * hd,
            "expert_ffn_dim": config.expert_ffn_dim,
        }
        if config.n_shared_experts:
            inputs["n_shared_experts * expert_ffn_dim"] = config.n_shared_experts * config.expert_ffn_dim
        if config.first_dense_layers:
            inputs["dense_ffn_dim"] = config.dense_ffn_dim
        for name, size in inputs.items():
            if size % quant.block_size:
                blockers.append(
                    f"deploy.int4_block_size={quant.block_size} must divide the model's {name}={size} "
                    "(weights are quantized in blocks along each matrix's input dimension)"
                )
    return blockers


def check_fused_graph(config: MoEConfig, quant: WeightQuant | None) -> None:
    """Raise UnsupportedGraph naming every field that keeps `config` from a fused graph."""
    blockers = fused_graph_blockers(config, quant)
    if blockers:
        raise UnsupportedGraph(
            "the fused ONNX graph cannot express this model: " + "; ".join(blockers) + " (or set deploy.graph: traced)"
        )
