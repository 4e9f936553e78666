"""Conversion between trainonce models and Hugging Face `Ernie4_5_MoeForCausalLM` checkpoints.

Pure torch: the names already match HF's (see models/moe.py), so conversion adds the `model.` prefix,
reshapes the correction bias to HF's (1, E) and drops our importance-order buffers. transformers itself is
only needed by whoever loads the result.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from models.config import MoEConfig
from models.moe import ElasticMoE

HF_ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
HF_MODEL_TYPE = "ernie4_5_moe"
_OUR_BUFFERS = ("layer_order", "expert_order")
_BIAS = "mlp.gate.e_score_correction_bias"
_HF_BIAS = "mlp.gate.moe_statics.e_score_correction_bias"
_FILE_BIAS = "mlp.moe_statics.e_score_correction_bias"  # where checkpoint files keep it
_FILE_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def hf_config_dict(config: MoEConfig) -> dict[str, Any]:
    """config.json content for transformers (raises ValueError naming a layer it cannot express)."""
    return {"architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE, **config.to_hf_dict()}


def to_hf_state_dict(model: ElasticMoE) -> dict[str, torch.Tensor]:
    """Our state dict renamed to HF's (tied output projection left to HF's weight tying)."""
    model.config.to_hf_dict()  # fail early, naming the layer, if HF cannot express this model
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(_OUR_BUFFERS):
            continue
        if name.endswith(_BIAS):
            out["model." + name.replace(_BIAS, _HF_BIAS)] = tensor.reshape(1, -1)
        elif name.startswith("lm_head."):
            out[name] = tensor
        else:
            out["model." + name] = tensor
    return out


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    """Our config for an HF ERNIE 4.5 MoE config dict; ValueError naming the field it cannot take."""
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise ValueError(f"model_type: expected {HF_MODEL_TYPE!r}, got {hf.get('model_type')!r}")
    n_layers = hf["num_hidden_layers"]
    checks = {
        "moe_layer_interval": (hf.get("moe_layer_interval", 1), 1),
        "moe_layer_end_index": (hf.get("moe_layer_end_index", n_layers - 1) % n_layers, n_layers - 1),
        "use_bias": (bool(hf.get("use_bias", False)), False),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
    }
    for field, (got, supported) in checks.items():
        if got != supported:
            raise ValueError(f"{field}: only {supported!r} is supported, got {got!r}")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 500000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type: only 'default' is supported, got {rope['rope_type']!r}")
    return MoEConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        n_experts=hf["moe_num_experts"],
        top_k=hf["moe_k"],
        expert_ffn_dim=hf["moe_intermediate_size"],
        n_shared_experts=hf.get("moe_num_shared_experts", 0),
        first_dense_layers=min(hf.get("moe_layer_start_index", 0), n_layers),
        dense_ffn_dim=hf["intermediate_size"],
        rope_theta=rope["rope_theta"],
        rms_norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        moe_norm_min=hf.get("moe_norm_min", 1e-12),
        init_std=hf.get("initializer_range", 0.02),
    )


def our_name(hf_name: str) -> str | None:
    """Our parameter name for a transformers one; None for tensors the causal LM does not use (ERNIE's
    multi-token-prediction head)."""
    if hf_name.startswith("mtp"):
        return None
    if hf_name == "lm_head.weight":
        return hf_name
    local = hf_name.removeprefix("model.")
    return local.replace(_HF_BIAS, _BIAS) if local.endswith(_HF_BIAS) else local


@torch.no_grad()
def copy_hf_tensors(model: ElasticMoE, tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Copy transformers-named tensors (any dtype) into `model`'s parameters in place, converting to their
    dtype; returns the names filled. Called once per group of tensors, so a large checkpoint never has a
    second full copy in memory."""
    state = model.state_dict()
    filled = set()
    for hf_name, tensor in tensors.items():
        name = our_name(hf_name)
        if name is None or (name == "lm_head.weight" and model.lm_head is None):
            continue  # tied embeddings: transformers may still list the head
        if name not in state:
            raise ValueError(f"state dict does not match the config: unexpected {hf_name}")
        target = state[name]
        value = tensor.reshape(target.shape) if name.endswith(_BIAS) else tensor
        if value.shape != target.shape:  # copy_ would broadcast silently
            raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)}, the config needs {tuple(target.shape)}")
        target.copy_(value)
        filled.add(name)
    return filled


def from_hf_state_dict(hf_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> ElasticMoE:
    """Build our model from an HF config dict and state dict (importance orders start as identity)."""
    model = ElasticMoE(config_from_hf(hf_config))
    missing = unfilled(model, copy_hf_tensors(model, state_dict))
    if missing:
        raise ValueError(f"state dict does not match the config: missing {missing[:5]}")
    return model


def unfilled(model: ElasticMoE, filled: set[str]) -> list[str]:
    """What `copy_hf_tensors` calls have not filled yet (our importance orders are not in HF checkpoints)."""
    return sorted(name for name in model.state_dict() if name not in filled and not name.endswith(_OUR_BUFFERS))


def hf_expected_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes an HF checkpoint of this config must hold (built on the meta device: no
    memory), to check a checkpoint's files before loading them."""
    with torch.device("meta"):
        model = ElasticMoE(config_from_hf(hf_config))
    return {name: tuple(tensor.shape) for name, tensor in to_hf_state_dict(model).items()}


def from_checkpoint_layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as checkpoint files hold them (one `experts.N.{gate,up,down}_proj.weight` per expert and
    `mlp.moe_statics.e_score_correction_bias`: how Baidu publishes ERNIE 4.5 and how transformers saves it) ->
    the stacked names of transformers' in-memory model, which `from_hf_state_dict` takes. Stacked tensors pass
    through; works on meta tensors too (to check shapes from file headers)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        match = _FILE_EXPERT.match(name)
        if match:
            experts[match["prefix"]][(int(match["index"]), match["proj"])] = tensor
        elif name.endswith(_FILE_BIAS):
            out[name.replace(_FILE_BIAS, _HF_BIAS)] = tensor
        else:
            out[name] = tensor
    for prefix, parts in experts.items():
        count = 1 + max(index for index, _ in parts)
        missing = [f"{e}.{p}_proj" for e in range(count) for p in ("gate", "up", "down") if (e, p) not in parts]
        if missing:
            raise ValueError(f"{prefix}: the files lack experts {missing[:5]}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(count)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(count)])
    return out
