"""The ONNX-friendly forward of a standalone model: one graph for prefill and for each decode step.

`ExportableDecoder(model)` wraps an extracted (or any standalone) `ElasticMoE` and computes

    input_ids (B, T), pad_lengths (B,), past_key_i / past_value_i (B, n_kv, P, hd) per layer
        -> logits (B, T, V), present_key_i / present_value_i (B, n_kv, P + T, hd)

with exactly the model's math. Why a separate forward rather than exporting `ElasticMoE.forward`:
- the past length P is an input shape, not Python state, so positions and the causal mask are computed
  from tensor shapes and one graph serves prefill (P = 0) and decoding (T = 1) alike;
- rows of different lengths share one call (the server batches decode steps across requests): row b's
  first `pad_lengths[b]` positions are left padding, which no token attends to and which does not count in
  the rotary positions, so a padded row computes exactly what it computes alone;
- experts run on the `export` path (static loop, nonzero + index_select/index_add: no argsort, bincount
  or grouped GEMM, none of which export) with one constant 2-D weight per expert matrix, and the output
  projection is its own constant matrix even when tied, so onnxruntime's quantizers see every large
  MatMul (stacked (E, 2F, D) tensors would stay fp32).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.moe import (
    Attention,
    DecoderLayer,
    ElasticMoE,
    MoEBlock,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    experts_export,
    repeat_kv,
    rope_cos_sin,
    route_top_k,
    token_modality,
)


def past_names(n_layers: int) -> list[str]:
    """ONNX input names of the cache, in the order `ExportableDecoder.forward` takes them."""
    return [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


class _CachedAttention(nn.Module):
    """The model's attention with the past as an input and an explicit end-aligned causal mask."""

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.attention = attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D); cos/sin (B, 1, T, hd); mask (B, 1, T, P+T), True where a query may see a key."""
        a = self.attention
        b, t, _ = x.shape
        q = a.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = a.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = a.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nkv, P+T, hd)
        n_rep = a.n_heads // a.n_kv_heads
        y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
        return a.o_proj(y.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim)), k, v


class _ExportableMoE(nn.Module):
    """The model's MoE block with each expert's matrices as separate constant 2-D parameters."""

    def __init__(self, block: MoEBlock) -> None:
        super().__init__()
        self.block = block
        # (D, 2F) and (F, D) per expert: see experts_export(pre_transposed=True)
        self.gate_up = nn.ParameterList(nn.Parameter(w.detach().t().contiguous()) for w in block.experts.gate_up_proj)
        self.down = nn.ParameterList(nn.Parameter(w.detach().t().contiguous()) for w in block.experts.down_proj)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        gate = self.block.gate  # stays fp32: the router runs as a Gemm, which the quantizers are told to skip
        mask = self.block.routing_mask(is_image)  # heterogeneous routing: each token within its modality's pool
        _, weights, expert_idx = route_top_k(
            flat, gate.weight, gate.e_score_correction_bias, self.block.top_k, self.block.norm_min, mask
        )
        out = experts_export(flat, expert_idx, weights, list(self.gate_up), list(self.down), pre_transposed=True)
        out = out.reshape(b, t, d)
        if self.block.shared_experts is not None:
            out = out + self.block.shared_experts(x)  # on (B, T, D): exported as MatMul, so it quantizes
        return out


class _ExportableLayer(nn.Module):
    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        self.input_layernorm: RMSNorm = layer.input_layernorm
        self.post_attention_layernorm: RMSNorm = layer.post_attention_layernorm
        self.self_attn = _CachedAttention(layer.self_attn)
        self.mlp: _ExportableMoE | SwiGLU = _ExportableMoE(layer.mlp) if isinstance(layer.mlp, MoEBlock) else layer.mlp

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        is_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + attn
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, is_image) if isinstance(self.mlp, _ExportableMoE) else self.mlp(h)), k, v


class ExportableDecoder(nn.Module):
    """A standalone model as `(input_ids, *past) -> (logits, *present)`; see the module docstring."""

    def __init__(self, model: ElasticMoE) -> None:
        super().__init__()
        self.config = model.config
        self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList(_ExportableLayer(cast(DecoderLayer, layer)) for layer in model.layers)
        self.norm = model.norm
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self.lm_head = nn.Parameter(head.detach().clone())  # (V, D), its own constant even when tied

    def forward(
        self, input_ids: torch.Tensor, pad_lengths: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """input_ids (B, T), pad_lengths (B,) and 2 * n_layers past tensors (B, nkv, P, hd) -> logits (B, T, V)
        and presents (B, nkv, P+T, hd)."""
        b, t = input_ids.shape
        p = past[0].shape[2]
        hd = self.config.attn_head_dim
        query_pos = torch.arange(t, device=input_ids.device) + p  # (T,) index in the row, padding included
        key_pos = torch.arange(p + t, device=input_ids.device)  # (P+T,)
        pad = pad_lengths.to(torch.int64)[:, None]  # (B, 1)
        positions = (query_pos[None, :] - pad).clamp(min=0)  # (B, T): rotary positions skip the padding
        cos, sin = rope_cos_sin(positions.reshape(-1), hd, self.config.rope_theta)
        cos, sin = cos.view(b, 1, t, hd), sin.view(b, 1, t, hd)
        causal = key_pos[None, None, :] <= query_pos[None, :, None]  # (1, T, P+T): the past and itself
        real = key_pos[None, None, :] >= pad[:, :, None]  # (B, 1, P+T): not padding
        itself = key_pos[None, None, :] == query_pos[None, :, None]  # a padding query sees itself: no NaN
        mask = ((causal & real) | itself)[:, None]  # (B, 1, T, P+T)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        is_image = token_modality(self.config, input_ids)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1], is_image)
            presents += [k, v]
        logits = F.linear(self.norm(x), self.lm_head)
        return (logits, *presents)

    @staticmethod
    def no_padding(batch: int) -> torch.Tensor:
        return torch.zeros(batch, dtype=torch.int64)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        """The cache before the first token: 2 * n_layers tensors (B, nkv, 0, hd)."""
        shape = (batch, self.config.n_kv_heads, 0, self.config.attn_head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.config.n_layers)]
