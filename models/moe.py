"""The elastic Mixture-of-Experts decoder, read top to bottom in data-flow order.

The math is exactly transformers' ERNIE 4.5 MoE (`Ernie4_5_MoeForCausalLM`): pre-norm RMSNorm computed in
fp32, interleaved RoPE, grouped-query causal attention, SwiGLU experts stored stacked as `gate_up_proj`
(E, 2F, D) and `down_proj` (E, D, F), an fp32 softmax router whose top-k is chosen on softmax + a
selection-only correction bias and whose weights are renormalised over the chosen k, and an optional
always-on shared expert. Parameter names follow the HF state dict so conversion is a rename.

Elasticity: `model(tokens, subnet=spec)` runs exactly the sub-model `spec` names. Skipped layers are the
identity, and each kept MoE layer routes among its kept experts only (softmax over the kept router rows),
which is what an extracted model with a sliced router computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.config import MoEConfig
from models.subnet import Importance, SubnetSpec

KeyValue = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (B, n_kv_heads, T, head_dim)

# ---------------------------------------------------------------------------------------------------------
# Math as free functions


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of interleaved RoPE for `positions` (T,), each (T, head_dim), in fp32.

    ERNIE rotates adjacent pairs (0,1), (2,3), ... so frequency i is repeated for dims 2i and 2i+1.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    freqs = freqs.repeat_interleave(2, dim=-1)  # (T, hd)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of `x` (B, h, T, hd) by the angles in cos/sin (T, hd); computed in fp32."""
    xf = x.float()
    rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)  # (B, h, T, hd)
    return (xf * cos + rotated * sin).to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv, T, hd) -> (B, kv * n_rep, T, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, kv, t, hd = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, hd).reshape(b, kv * n_rep, t, hd)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: x (N, D), gate_up (2F, D) with the gate rows first, down (D, F) -> (N, D)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def route_top_k(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    norm_min: float,
    pool_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ERNIE 4.5's router, always in fp32.

    hidden (T, D), weight (E, D), bias (E,) -> logits (T, E), weights (T, k), local expert indices (T, k).
    The bias only changes which experts are chosen; the weights come from the plain softmax and are
    renormalised over the chosen k, so they do not depend on which other experts exist.

    `pool_mask` (T, E), 0 where a token may use an expert and -1e9 where not (heterogeneous routing: another
    modality's pool), is added to the logits and to the selection scores: the softmax runs over the token's pool
    only, as a separate router per pool would (ERNIE 4.5-VL), and no bias can pick an expert outside it.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), weight.float())
        if pool_mask is not None:
            logits = logits + pool_mask
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        scores = probs + bias.float() if pool_mask is None else probs + bias.float() + pool_mask
        _, chosen = torch.topk(scores, top_k, dim=-1)
        weights = probs.gather(-1, chosen)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min)
    return logits, weights, chosen


def image_mask(tokens: torch.Tensor, first_code: int, codes: int) -> torch.Tensor:
    """True where a token is one of the `codes` image codes from id `first_code` on; the image markers are text
    (the text decides to open an image and closes it)."""
    return (tokens >= first_code) & (tokens < first_code + codes)


def token_modality(config: MoEConfig, tokens: torch.Tensor) -> torch.Tensor | None:
    """Which tokens are image codes, for heterogeneous routing (None for shared routing, which never asks): computed
    from the ids, so neither the model nor its exported graph takes a new input."""
    if config.routing != "heterogeneous" or config.image_token_range is None:
        return None
    return image_mask(tokens, *config.image_token_range)


def expert_pools(image_experts: torch.Tensor, heterogeneous: bool) -> tuple[torch.Tensor, ...]:
    """A layer's expert pools as (E,) masks: text and image experts under heterogeneous routing, one pool of every
    expert under shared routing. Masks, not `unique()`: no host sync per layer on a GPU."""
    return (~image_experts, image_experts) if heterogeneous else (torch.ones_like(image_experts),)


def pool_mask(image_experts: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """(T, E) additive router mask of heterogeneous routing: 0 where token t's modality (`is_image` (T,)) matches
    expert e's pool (`image_experts` (E,)), -1e9 elsewhere (not -inf: a row stays finite)."""
    allowed = image_experts[None, :] == is_image.reshape(-1, 1)
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, -1e9)


def orthogonal_loss(rows: torch.Tensor) -> torch.Tensor:
    """ERNIE 4.5's router orthogonal loss of one pool's router rows (E, D): the mean over the E x E entries of
    (Ŵ Ŵᵀ - I)², Ŵ the rows scaled to unit length. 0 for orthonormal rows; rows (1, 0) and (1, 1)/√2 give 0.25."""
    unit = rows.float() / rows.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    gram = unit @ unit.T
    return (gram - torch.eye(len(rows), device=rows.device)).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------
# Expert compute: three paths that agree numerically


def _sort_by_expert(expert_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of the (token, slot) pairs grouped by expert, and the number of pairs per expert."""
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts


def experts_loop(
    x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """CPU path: sort tokens by expert and run each expert that got tokens on its contiguous slice.

    split/unbind/cat rather than slicing and indexing: their backward is one cat/stack, where a slice or
    an index per expert would each allocate and fill a gradient the size of the whole tensor.
    """
    t, k = expert_idx.shape
    order, counts = _sort_by_expert(expert_idx, gate_up.shape[0])
    token_of_pair = order // k
    x_sorted = x.index_select(0, token_of_pair)  # (T*k, D)
    sizes = counts.tolist()
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    chunks = x_sorted.split(sizes)
    out = torch.cat(
        [swiglu(h, gate_ups[e], downs[e]) if n else h for e, (h, n) in enumerate(zip(chunks, sizes, strict=True))]
    )
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, out.to(x.dtype))  # bf16 autocast: back to x's dtype


def experts_grouped_mm(
    x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Grouped-GEMM path (`torch._grouped_mm`): all experts in two kernel launches; bf16 on CUDA."""
    t, k = expert_idx.shape
    order, counts = _sort_by_expert(expert_idx, gate_up.shape[0])
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)
    token_of_pair = order // k
    dtype = torch.bfloat16 if x.is_cuda else x.dtype  # CUDA grouped GEMM kernels are bf16
    x_sorted = x.index_select(0, token_of_pair).to(dtype)
    gate, up = torch._grouped_mm(x_sorted, gate_up.to(dtype).transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, down.to(dtype).transpose(1, 2), offs=offsets).to(x.dtype)
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, out.to(x.dtype))  # bf16 autocast: back to x's dtype


def experts_export(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
    pre_transposed: bool = False,
) -> torch.Tensor:
    """ONNX-traceable path: a static loop over experts with nonzero + index_select/index_add.

    No data-dependent Python control flow and no argsort/bincount/grouped GEMM (none of them export).
    `gate_up`/`down` are stacked tensors or sequences of per-expert 2-D matrices. With `pre_transposed`
    they are given as (D, 2F) and (F, D) and applied with a plain matmul, which exporters emit as a MatMul
    on a constant: the form onnxruntime's 4-bit quantizer rewrites (it skips Gemm). models/onnx_forward.py.
    """
    out = torch.zeros_like(x)
    for e in range(len(gate_up)):
        hit = expert_idx == e  # (T, k); an expert appears at most once per token
        tokens = torch.nonzero(hit.sum(dim=-1) > 0).squeeze(-1)
        token_weight = (weights * hit.to(weights.dtype)).sum(dim=-1).index_select(0, tokens)
        h = x.index_select(0, tokens)
        if pre_transposed:
            gate, up = (h @ gate_up[e]).chunk(2, dim=-1)
            y = F.silu(gate) * up @ down[e]
        else:
            y = swiglu(h, gate_up[e], down[e])
        y = y * token_weight[:, None].to(x.dtype)
        out = out.index_add(0, tokens, y)
    return out


EXPERT_PATHS = {"loop": experts_loop, "grouped_mm": experts_grouped_mm, "export": experts_export}


# ---------------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """RMSNorm normalising in fp32, then scaling in the input dtype (as ERNIE does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with interleaved RoPE."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        hd = config.attn_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.q_proj = nn.Linear(config.d_model, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KeyValue | None = None
    ) -> tuple[torch.Tensor, KeyValue]:
        """x (B, T, D) -> (B, T, D) and the keys/values of all tokens so far (past + these T)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nkv, T_all, hd)
        n_rep = self.n_heads // self.n_kv_heads
        if past is None:
            mask, causal = None, True
        elif t == 1:
            mask, causal = None, False  # one new token attends to everything before it
        else:  # several new tokens after a past: causal, aligned to the end of the keys
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            causal = False
        y = F.scaled_dot_product_attention(
            q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, is_causal=causal
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)), (k, v)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP: the FFN of dense layers and the shared experts."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Router weights (fp32, as ERNIE keeps them) and the selection-only correction bias."""

    e_score_correction_bias: torch.Tensor

    def __init__(self, config: MoEConfig, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, config.d_model, dtype=torch.float32))
        # Not a parameter: the optimiser never touches it; load balancing nudges it (load_balancing=bias).
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))


class Experts(nn.Module):
    """Routed experts stored stacked, in the HF layout."""

    def __init__(self, config: MoEConfig, n_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * config.expert_ffn_dim, config.d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, config.d_model, config.expert_ffn_dim))


def pool_balancing_loss(
    probs: torch.Tensor, chosen: torch.Tensor, image_experts: torch.Tensor, is_image: torch.Tensor
) -> torch.Tensor:
    """Heterogeneous routing's load-balancing loss: the Switch loss of each pool over its own tokens (ERNIE 4.5
    balances each modality apart), weighted by the pool's share of the tokens, so it is 1.0 when both pools are
    balanced, as the shared loss is.

    probs (T, E) the routing softmax (zero outside a token's pool), chosen (T, k) local expert indices,
    image_experts (E,) bool, is_image (T,) bool."""
    total = probs.new_zeros(())
    for image in (False, True):
        tokens, experts = is_image == image, image_experts == image
        if not bool(tokens.any()):
            continue
        pairs = chosen[tokens].reshape(-1)
        fraction = torch.bincount(pairs, minlength=len(image_experts)).float()[experts] / pairs.numel()
        mean_prob = probs[tokens][:, experts].mean(dim=0)
        share = tokens.float().mean()
        total = total + share * int(experts.sum()) * (fraction.detach() * mean_prob).sum()
    return total


@dataclass(frozen=True)
class RoutingStats:
    """What one MoE layer did in one forward: for load balancing and routing-health plots."""

    layer: int
    expert_load: torch.Tensor  # (E_layer,) fraction of routed (token, slot) pairs per expert, 0 where dropped
    kept: torch.Tensor  # (E_layer,) bool, the experts this sub-model routes among
    aux_loss: torch.Tensor  # scalar, Switch-style N * sum(f_i * P_i) over kept experts; 1.0 when balanced
    z_loss: torch.Tensor  # scalar, mean logsumexp(router logits)^2
    assignments: torch.Tensor  # (T, k) the experts (global ids) each token was routed to: who serves which tokens
    image_experts: torch.Tensor  # (E_layer,) bool, the experts of the image pool (all False: one shared pool)
    orthogonal_loss: torch.Tensor  # scalar, the router orthogonal loss summed over pools (0 unless its coef > 0)


class MoEBlock(nn.Module):
    """Sparse MoE FFN: router, routed experts and the optional shared experts."""

    expert_order: torch.Tensor
    image_experts: torch.Tensor

    def __init__(self, config: MoEConfig, layer: int) -> None:
        super().__init__()
        n_experts = config.experts_in_layer(layer)
        self.layer, self.top_k, self.norm_min = layer, config.top_k, config.moe_norm_min
        self.expert_impl = config.expert_impl
        self.heterogeneous, self.orthogonal = config.routing == "heterogeneous", config.orthogonal_loss_coef > 0
        self.gate = Router(config, n_experts)
        self.experts = Experts(config, n_experts)
        self.shared_experts = (
            SwiGLU(config.d_model, config.expert_ffn_dim * config.n_shared_experts) if config.n_shared_experts else None
        )
        # Importance order of this layer's experts, most important first; saved with the weights.
        self.register_buffer("expert_order", torch.arange(n_experts))
        # The image pool (heterogeneous routing): the last n_image_experts. Derived from the config, not saved.
        image_experts = torch.arange(n_experts) >= n_experts - config.n_image_experts
        self.register_buffer("image_experts", image_experts & self.heterogeneous, persistent=False)

    @property
    def n_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    def _impl(self, x: torch.Tensor) -> str:
        if self.expert_impl != "auto":
            return self.expert_impl
        aligned = self.experts.gate_up_proj.shape[-1] % 8 == 0 and self.experts.down_proj.shape[-1] % 8 == 0
        return "grouped_mm" if x.is_cuda and aligned and hasattr(torch, "_grouped_mm") else "loop"

    def routing_mask(self, is_image: torch.Tensor | None, kept: torch.Tensor | None = None) -> torch.Tensor | None:
        """The router mask that keeps each token in its modality's pool (`pool_mask`); None for shared routing."""
        if not self.heterogeneous:
            return None
        if is_image is None:
            raise ValueError(f"layer {self.layer}: heterogeneous routing needs each token's modality")
        image_experts = self.image_experts if kept is None else self.image_experts.index_select(0, kept)
        return pool_mask(image_experts, is_image)

    def forward(
        self,
        x: torch.Tensor,
        kept: torch.Tensor | None = None,
        top_k: int | None = None,
        is_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingStats]:
        """x (B, T, D); `kept` (E_kept,) global indices of the experts to route among (None: all); `is_image` (B, T)
        each token's modality (heterogeneous routing only)."""
        b, t, d = x.shape
        k = top_k or self.top_k
        flat = x.reshape(b * t, d)
        weight: torch.Tensor = self.gate.weight
        bias = self.gate.e_score_correction_bias
        if kept is not None:
            weight, bias = weight.index_select(0, kept), bias.index_select(0, kept)
        mask = self.routing_mask(is_image, kept)
        logits, weights, local_idx = route_top_k(flat, weight, bias, k, self.norm_min, mask)
        expert_idx = local_idx if kept is None else kept[local_idx]  # (T', k) global expert ids
        path = EXPERT_PATHS[self._impl(x)]
        out = path(flat, expert_idx, weights, self.experts.gate_up_proj, self.experts.down_proj)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        image_rows = is_image.reshape(-1) if mask is not None and is_image is not None else None
        return out.reshape(b, t, d), self._stats(logits, weight, local_idx, expert_idx, kept, image_rows)

    def _stats(
        self,
        logits: torch.Tensor,
        weight: torch.Tensor,
        local_idx: torch.Tensor,
        expert_idx: torch.Tensor,
        kept: torch.Tensor | None,
        is_image: torch.Tensor | None,
    ) -> RoutingStats:
        n_kept = logits.shape[-1]
        probs = F.softmax(logits, dim=-1)
        pair_fraction = torch.bincount(local_idx.reshape(-1), minlength=n_kept).float() / local_idx.numel()
        image_experts = self.image_experts if kept is None else self.image_experts.index_select(0, kept)
        if is_image is None:
            aux = n_kept * (pair_fraction.detach() * probs.mean(dim=0)).sum()
        else:
            aux = pool_balancing_loss(probs, local_idx, image_experts, is_image)
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        ortho = logits.new_zeros(())
        if self.orthogonal:
            pools = expert_pools(image_experts, self.heterogeneous)
            ortho = sum((orthogonal_loss(weight[pool]) for pool in pools), ortho)
        load = torch.zeros(self.n_experts, device=logits.device)
        kept_mask = torch.zeros(self.n_experts, dtype=torch.bool, device=logits.device)
        index = kept if kept is not None else torch.arange(self.n_experts, device=logits.device)
        load[index] = pair_fraction.detach()
        kept_mask[index] = True
        return RoutingStats(self.layer, load, kept_mask, aux, z, expert_idx.detach(), self.image_experts, ortho)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: MoEConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp: MoEBlock | SwiGLU = (
            MoEBlock(config, layer) if config.is_moe_layer(layer) else SwiGLU(config.d_model, config.dense_ffn_dim)
        )
        self.input_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kept: torch.Tensor | None = None,
        top_k: int | None = None,
        past: KeyValue | None = None,
        is_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingStats | None, KeyValue]:
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + attn
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEBlock):
            ffn, stats = self.mlp(h, kept, top_k, is_image)
            return x + ffn, stats, present
        return x + self.mlp(h), None, present


@dataclass
class KVCache:
    """Keys and values of every token seen so far, per supernet layer, so generation costs one step per token.

    Tied to one sub-model: reuse a cache only with the spec that filled it.
    """

    layers: dict[int, KeyValue] = field(default_factory=dict)  # layer -> ((B, nkv, T, hd), (B, nkv, T, hd))
    length: int = 0  # tokens cached


@dataclass(frozen=True)
class MoEOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar: mean over executed MoE layers (0 when there are none)
    z_loss: torch.Tensor  # scalar: mean over executed MoE layers
    routing: tuple[RoutingStats, ...]

    def balancing_loss(self, config: MoEConfig) -> torch.Tensor:
        """What the optimiser adds to the LM loss for the router: load balancing (the auxiliary loss, none in
        `bias` mode), the z-loss, and the router orthogonal loss (mean over executed MoE layers) when weighted."""
        loss = self.z_loss * config.z_loss_coef
        if config.load_balancing != "bias":
            loss = loss + self.aux_loss * config.aux_loss_coef
        if config.orthogonal_loss_coef and self.routing:
            loss = loss + config.orthogonal_loss_coef * torch.stack([s.orthogonal_loss for s in self.routing]).mean()
        return loss


class ElasticMoE(nn.Module):
    """The supernet (or an extracted sub-model: the same class with a smaller config)."""

    layer_order: torch.Tensor

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Importance order of the layers, most important first; saved with the weights.
        self.register_buffer("layer_order", torch.arange(config.n_layers))
        self._plans: dict[SubnetSpec, list[tuple[int, torch.Tensor | None]]] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    # -- importance --------------------------------------------------------------------------------------

    def importance(self) -> Importance:
        """The layer and expert orders stored in this model."""
        return Importance(
            layer_order=tuple(self.layer_order.tolist()),
            expert_order=tuple(
                tuple(layer.mlp.expert_order.tolist()) if isinstance(layer.mlp, MoEBlock) else ()
                for layer in self.layers
            ),
        )

    @torch.no_grad()
    def set_importance(self, importance: Importance) -> None:
        importance.check_fits(self.config)
        self.layer_order.copy_(torch.tensor(importance.layer_order))
        for layer, order in zip(self.layers, importance.expert_order, strict=True):
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.expert_order.copy_(torch.tensor(order))

    # -- forward ----------------------------------------------------------------------------------------

    def _plan(self, subnet: SubnetSpec | None, device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
        """(layer index, kept expert indices or None) per layer to run; validated once per spec."""
        if subnet is None:
            return [(i, None) for i in range(self.config.n_layers)]
        plan = self._plans.get(subnet)
        if plan is None or (plan and any(k is not None and k.device != device for _, k in plan)):
            subnet.check_fits(self.config)
            plan = [
                (layer, torch.tensor(kept, device=device) if kept else None)
                for layer, kept in zip(subnet.layers, subnet.experts, strict=True)
            ]
            self._plans[subnet] = plan
        return plan

    def forward(
        self, tokens: torch.Tensor, subnet: SubnetSpec | None = None, cache: KVCache | None = None
    ) -> MoEOutput:
        """tokens (B, T) -> logits (B, T, V) of the full model, or of exactly the sub-model `subnet`.

        With `cache`, `tokens` continue the cached ones (positions start at `cache.length`) and the cache
        is extended in place.
        """
        _, t = tokens.shape
        start = cache.length if cache is not None else 0
        if start + t > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + t} exceeds max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(start, start + t, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.config.attn_head_dim, self.config.rope_theta)
        x = self.embed_tokens(tokens)  # (B, T, D)
        top_k = subnet.top_k if subnet is not None else None
        is_image = token_modality(self.config, tokens)
        stats: list[RoutingStats] = []
        for layer, kept in self._plan(subnet, tokens.device):
            past = cache.layers.get(layer) if cache is not None else None
            x, layer_stats, present = self.layers[layer](x, cos, sin, kept, top_k, past, is_image)
            if cache is not None:
                cache.layers[layer] = present
            if layer_stats is not None:
                stats.append(layer_stats)
        if cache is not None:
            cache.length += t
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)
        zero = logits.new_zeros(())
        aux = torch.stack([s.aux_loss for s in stats]).mean() if stats else zero
        z = torch.stack([s.z_loss for s in stats]).mean() if stats else zero
        return MoEOutput(logits, aux, z, tuple(stats))

    @torch.no_grad()
    def update_routing_bias(self, routing: tuple[RoutingStats, ...] | list[RoutingStats]) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): raise the selection bias of under-loaded kept experts
        and lower it for over-loaded ones by `bias_update_rate`, each against its own pool's mean load (the image
        pool serves fewer tokens than the text pool). Call after each optimiser step, with every forward of it.

        One update per layer per call, as DeepSeek-V3 makes one per step: forwards that routed among the same
        experts (the micro-batches of one sub-model) count as one batch, their loads averaged; each such expert set
        then votes sign(pool mean - load) for its experts, and an expert moves by the rate times the mean of its
        votes. The step stays `bias_update_rate` however many micro-batches and sub-models a step accumulates."""
        rate = self.config.bias_update_rate
        forwards: dict[tuple[int, tuple[bool, ...]], list[RoutingStats]] = {}
        for s in routing:
            forwards.setdefault((s.layer, tuple(s.kept.tolist())), []).append(s)
        votes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (sum of votes, number of votes)
        for (layer, _), same_experts in forwards.items():
            block = self.layers[layer].mlp
            assert isinstance(block, MoEBlock), f"layer {layer} is not an MoE layer"
            load = torch.stack([s.expert_load for s in same_experts]).mean(0)
            vote, voted = torch.zeros_like(load), torch.zeros_like(load)
            first = same_experts[0]
            for pool in expert_pools(first.image_experts, block.heterogeneous):
                members = first.kept & pool
                vote[members] = torch.sign(load[members].mean() - load[members])
                voted[members] = 1.0
            total, count = votes.get(layer, (torch.zeros_like(load), torch.zeros_like(load)))
            votes[layer] = (total + vote, count + voted)
        for layer, (total, count) in votes.items():
            block = self.layers[layer].mlp
            assert isinstance(block, MoEBlock)
            block.gate.e_score_correction_bias += rate * total / count.clamp_min(1.0)

    # -- accounting -------------------------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
