"""Configuration of the elastic MoE transformer.

The fields mirror transformers' `Ernie4_5_MoeConfig` one to one (see `to_hf_dict`), because the model's math
is exactly ERNIE 4.5 MoE: every model trainonce trains or extracts must be expressible as that architecture.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ExpertImpl = Literal["auto", "loop", "grouped_mm", "export"]
LoadBalancing = Literal["aux_loss", "bias"]
Routing = Literal["shared", "heterogeneous"]


class MoEConfig(BaseModel):
    """Shape and routing hyper-parameters of one (super- or sub-) model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(2048, ge=16, le=1_048_576, description="Tokenizer vocabulary size.")
    d_model: int = Field(64, ge=8, le=65_536, description="Hidden size (ERNIE `hidden_size`).")
    n_layers: int = Field(4, ge=1, le=256, description="Number of decoder layers in the supernet.")
    n_heads: int = Field(4, ge=1, le=512, description="Query heads per attention layer.")
    n_kv_heads: int = Field(
        2, ge=1, le=512, description="Key/value heads (grouped-query attention); must divide n_heads."
    )
    head_dim: int | None = Field(
        None, ge=2, le=1024, description="Per-head size; defaults to d_model // n_heads. Must be even (RoPE)."
    )
    n_experts: int = Field(8, ge=1, le=1024, description="Routed experts in each MoE layer of the supernet.")
    layer_n_experts: tuple[int, ...] | None = Field(
        None,
        description="Per-layer routed expert counts for non-uniform extracted models (length n_layers; "
        "entries of dense layers are ignored). None means every MoE layer has n_experts.",
    )
    top_k: int = Field(2, ge=1, le=1024, description="Experts each token is routed to (ERNIE `moe_k`).")
    expert_ffn_dim: int = Field(
        64, ge=1, le=262_144, description="SwiGLU hidden size of one routed expert (`moe_intermediate_size`)."
    )
    n_shared_experts: int = Field(
        1,
        ge=0,
        le=64,
        description="Always-on shared experts; they form one SwiGLU of width n_shared_experts * expert_ffn_dim.",
    )
    first_dense_layers: int = Field(
        0,
        ge=0,
        le=256,
        description="Leading layers with a dense SwiGLU instead of MoE (ERNIE `moe_layer_start_index`).",
    )
    dense_ffn_dim: int = Field(
        256, ge=1, le=1_048_576, description="SwiGLU hidden size of the dense layers (`intermediate_size`)."
    )
    rope_theta: float = Field(10_000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(1e-5, gt=0, le=1e-2, description="Epsilon of every RMSNorm.")
    max_seq_len: int = Field(2048, ge=8, le=1_048_576, description="Longest context the model is used with.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output projection.")
    moe_norm_min: float = Field(
        1e-12, gt=0, le=1e-3, description="Floor of the top-k weight sum when renormalising routing weights."
    )
    load_balancing: LoadBalancing = Field(
        "aux_loss",
        description="`aux_loss`: Switch-style auxiliary loss plus router z-loss. `bias`: the auxiliary-loss-free "
        "per-expert selection bias of DeepSeek-V3 / ERNIE 5.0, nudged toward balanced load after each step.",
    )
    aux_loss_coef: float = Field(1e-2, ge=0, le=10, description="Weight of the load-balancing auxiliary loss.")
    z_loss_coef: float = Field(1e-3, ge=0, le=10, description="Weight of the router z-loss (ST-MoE).")
    bias_update_rate: float = Field(
        1e-3, ge=0, le=1, description="Step size of the selection-bias update (load_balancing=bias)."
    )
    routing: Routing = Field(
        "shared",
        description="`shared`: one pool of routed experts for every token, the router never told a token's "
        "modality (ERNIE 5.0). `heterogeneous`: the last n_image_experts routed experts of each MoE layer serve "
        "image tokens and the others text tokens, each token routed within its modality's pool (ERNIE 4.5's "
        "modality-isolated routing); the shared experts serve both. Heterogeneous models leave as ONNX only.",
    )
    image_token_range: tuple[int, int] | None = Field(
        None,
        description="(first id, count) of the image codes in the vocabulary, set from data.images; the image "
        "markers are text. None: a text-only vocabulary.",
    )
    n_image_experts: int = Field(
        0, ge=0, le=1024, description="Routed experts per MoE layer that serve image tokens (routing=heterogeneous)."
    )
    orthogonal_loss_coef: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Weight of ERNIE 4.5's router orthogonal loss, which pushes the router rows of each expert "
        "pool toward orthogonal directions (0: off).",
    )
    init_std: float = Field(0.02, gt=0, le=1, description="Std of the normal weight initialisation.")
    expert_impl: ExpertImpl = Field(
        "auto",
        description="Expert compute path: `grouped_mm` (CUDA grouped GEMM), `loop` (CPU), `export` "
        "(ONNX-traceable), `auto` = grouped_mm on CUDA else loop. All three agree numerically.",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> MoEConfig:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set head_dim explicitly)")
        if self.attn_head_dim % 2:
            raise ValueError(f"head_dim={self.attn_head_dim} must be even for rotary embeddings")
        if self.expert_impl == "grouped_mm" and (self.d_model % 8 or self.expert_ffn_dim % 8):
            raise ValueError(
                f"expert_impl=grouped_mm needs d_model ({self.d_model}) and expert_ffn_dim "
                f"({self.expert_ffn_dim}) to be multiples of 8 (16-byte aligned strides)"
            )
        if self.first_dense_layers > self.n_layers:
            raise ValueError(f"first_dense_layers={self.first_dense_layers} must be <= n_layers={self.n_layers}")
        if self.layer_n_experts is not None:
            if len(self.layer_n_experts) != self.n_layers:
                raise ValueError(
                    f"layer_n_experts has {len(self.layer_n_experts)} entries, expected n_layers={self.n_layers}"
                )
            if any(n < 1 for n in self.layer_n_experts[self.first_dense_layers :]):
                raise ValueError("layer_n_experts: every MoE layer needs at least 1 expert")
        for layer in self.moe_layers:
            if self.top_k > self.experts_in_layer(layer):
                raise ValueError(
                    f"top_k={self.top_k} must be <= the experts of layer {layer} ({self.experts_in_layer(layer)})"
                )
        self._check_routing()
        return self

    def _check_routing(self) -> None:
        if self.image_token_range is not None:
            first, count = self.image_token_range
            if first < 0 or count < 1 or first + count > self.vocab_size:
                raise ValueError(
                    f"image_token_range={self.image_token_range}: the codes must lie in the vocabulary "
                    f"(0..{self.vocab_size - 1})"
                )
        if self.routing == "shared":
            if self.n_image_experts:
                raise ValueError(f"n_image_experts={self.n_image_experts} needs routing=heterogeneous")
            return
        if self.image_token_range is None:
            raise ValueError("routing=heterogeneous needs image_token_range (data with images sets it)")
        for layer in self.moe_layers:
            pools = [len(pool) for pool in self.expert_pools(layer)]
            if not 1 <= self.n_image_experts < self.experts_in_layer(layer) or self.top_k > min(pools):
                raise ValueError(
                    f"n_image_experts={self.n_image_experts}: layer {layer} has {self.experts_in_layer(layer)} "
                    f"routed experts; allowed: 1..{self.experts_in_layer(layer) - 1}, leaving at least "
                    f"top_k={self.top_k} in each of the text and image pools"
                )

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def moe_layers(self) -> range:
        return range(self.first_dense_layers, self.n_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers

    def experts_in_layer(self, layer: int) -> int:
        """Routed experts of `layer` (0 for a dense layer)."""
        if not self.is_moe_layer(layer):
            return 0
        return self.layer_n_experts[layer] if self.layer_n_experts is not None else self.n_experts

    def expert_pools(self, layer: int) -> tuple[range, ...]:
        """The routed experts of `layer` grouped by the tokens they serve: one pool for every token (shared
        routing), or the text pool then the image pool (heterogeneous routing)."""
        n = self.experts_in_layer(layer)
        if self.routing == "shared" or not self.is_moe_layer(layer):
            return (range(n),)
        return (range(n - self.n_image_experts), range(n - self.n_image_experts, n))

    @property
    def uniform_experts(self) -> bool:
        return len({self.experts_in_layer(i) for i in self.moe_layers}) <= 1

    def to_hf_dict(self) -> dict:
        """The equivalent `Ernie4_5_MoeConfig` keyword arguments.

        Raises ValueError naming the layer when the model is not expressible there (ERNIE takes one expert
        count for all MoE layers), or the routing (Ernie4_5_MoeForCausalLM routes every token in one pool).
        """
        if self.routing == "heterogeneous":
            raise ValueError(
                "pretrain.model.routing=heterogeneous: Ernie4_5_MoeForCausalLM routes every token in one pool; a "
                "heterogeneous model leaves as ONNX (deploy.graph: traced) or the MLflow pyfunc only"
            )
        if not self.uniform_experts:
            counts = {i: self.experts_in_layer(i) for i in self.moe_layers}
            first = self.experts_in_layer(self.first_dense_layers)
            bad = next(i for i, n in counts.items() if n != first)
            raise ValueError(
                f"layer {bad} has {counts[bad]} experts but layer {self.first_dense_layers} has {first}: "
                "Ernie4_5_MoeConfig needs the same expert count in every MoE layer"
            )
        n_experts = self.experts_in_layer(self.first_dense_layers) if self.moe_layers else self.n_experts
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.dense_ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.attn_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "initializer_range": self.init_std,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "use_bias": False,
            "moe_intermediate_size": self.expert_ffn_dim,
            "moe_k": self.top_k,
            "moe_num_experts": n_experts,
            "moe_num_shared_experts": self.n_shared_experts,
            "moe_layer_start_index": self.first_dense_layers,
            "moe_layer_end_index": self.n_layers - 1,
            "moe_layer_interval": 1,
            "moe_norm_min": self.moe_norm_min,
        }
