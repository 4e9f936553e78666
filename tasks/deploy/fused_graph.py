"""The decoder of a standalone model as an ONNX graph of onnxruntime's fused LLM operators.

Tracing the PyTorch forward (models/onnx_forward.py) spells every piece of shape work out node by node: a decode
step of the tiny preset ran ~450 onnxruntime kernels per layer (the routing's nonzero/index_select/index_add for
every expert, the rotary embedding, the padding mask). This module writes the graph directly from the
`com.microsoft` operators that onnxruntime-genai's model builder emits, so a layer is about ten kernels:

    SkipSimplifiedLayerNormalization   input_layernorm (adds the previous sub-layer's output to the residual)
    MatMul | MatMulNBits               q|k|v packed into one projection
    GroupQueryAttention                interleaved rotary inside, KV cache, per-row lengths
    MatMul | MatMulNBits               o_proj
    SkipSimplifiedLayerNormalization   post_attention_layernorm
    MoE layer    MatMul (router, fp32) -> MoE | QMoE (softmax, top-k, renormalised, SwiGLU experts)
                 + MoE | QMoE with one expert and a zero router (the shared experts), Add
    dense layer  MoE | QMoE with one expert and a zero router (the dense SwiGLU)

Graph contract (one graph for prefill and decode; rows right-padded, as onnxruntime-genai feeds GQA):

    input_ids (B, S) int64
    seqlens_k (B,) int32              per row: tokens cached after this call, minus 1 (past_len_b + S - 1)
    total_sequence_length () int32    max over rows of past_len_b + S
    past_key_i / past_value_i (B, n_kv, P, hd) float32; row b's keys are valid in [0, past_len_b)
 -> logits (B, S, V), present_key_i / present_value_i (B, n_kv, max(P, total), hd)

ERNIE 4.5's routing maps onto the operators exactly (docs/design.md, "The fused ONNX graph"): the MoE operators
take the router logits, apply softmax and top-k, and renormalise the chosen probabilities, which is `route_top_k`
when the selection bias is zero (the sum of the top-k probabilities is at least k/E, so `moe_norm_min` never
binds). A non-zero bias (`load_balancing: bias`) only changes which experts are chosen: the fp32 graph masks the
unchosen experts' logits to -inf before MoE (6 small nodes), the quantized graph passes the biased probabilities
for the choice and the plain ones for the weights (QMoE's `router_weights`). The router stays fp32 in every
variant: a wrong expert choice costs more than its bytes.

onnxruntime 1.31's fp32 MoE computes wrong outputs with `normalize_routing_weights=0` when the memory planner runs
it in place, so every MoE node here normalises (for a one-expert MoE, p / p = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from models.moe import ElasticMoE, MoEBlock, SwiGLU, rope_cos_sin
from tasks.deploy.block_quant import BlockQuantized, quantize_blockwise
from tasks.deploy.graph_limits import WeightQuant, check_fused_graph

MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses (it reads up to 13)
OPSET = 18


@dataclass
class FusedDecoder:
    """The graph, and the weights it really multiplies by, keyed by the model's parameter names: for a quantized
    graph those are the dequantized blocks, so `model_with_weights` gives a PyTorch twin that computes exactly what
    the graph computes."""

    proto: onnx.ModelProto
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def model_with_weights(self, model: ElasticMoE) -> ElasticMoE:
        twin = ElasticMoE(model.config)
        twin.load_state_dict(model.state_dict())
        state = twin.state_dict()
        for name, value in self.weights.items():
            state[name].copy_(value)
        return twin.eval()


def interleave_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """(E, 2F, D) with the F gate rows first -> rows g0, u0, g1, u1, ...: the only SwiGLU layout onnxruntime's CPU
    MoE kernels accept (`swiglu_fusion=1`)."""
    e, f2, d = gate_up.shape
    return gate_up.reshape(e, 2, f2 // 2, d).transpose(1, 2).reshape(e, f2, d)


def deinterleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """The inverse of interleave_gate_up."""
    e, f2, d = rows.shape
    return rows.reshape(e, f2 // 2, 2, d).transpose(1, 2).reshape(e, f2, d)


def swiglu_as_expert(mlp: SwiGLU) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense SwiGLU as one stacked expert: gate_up (1, 2F, D), gate rows first, and down (1, D, F)."""
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)[None]
    return gate_up.detach(), mlp.down_proj.weight.detach()[None]


class _GraphBuilder:
    """Nodes and initializers of one graph, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}

    def constant(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().contiguous().numpy()
        self.initializers[name] = np.ascontiguousarray(value)
        return name

    def node(
        self, op: str, inputs: list[str], name: str, outputs: int = 1, ms: bool = False, **attrs: Any
    ) -> list[str]:
        names = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=MS_DOMAIN if ms else None, **attrs))
        return names


class _DecoderGraph:
    """Writes the fused graph of one standalone ElasticMoE (see the module docstring)."""

    def __init__(self, model: ElasticMoE, quant: WeightQuant | None) -> None:
        self.model, self.config, self.quant = model.eval(), model.config, quant
        self.graph = _GraphBuilder()
        self.weights: dict[str, torch.Tensor] = {}
        self.zero_router = ""  # the one-expert MoEs' router logits, once built
        self.position_ids = ""  # the RotaryEmbedding path's positions, once built
        self.head: BlockQuantized | None = None

    def build(self) -> FusedDecoder:
        m = self.model
        x = self.embedding()
        residual, pending = x, ""  # pending: the last sub-layer's output, not yet added to the residual
        presents: dict[str, str] = {}
        for i, layer in enumerate(m.layers):
            p = f"layers.{i}"
            h, residual = self.norm(pending, residual, layer.input_layernorm.weight, f"{p}.input_layernorm")
            attn, presents[f"present_key_{i}"], presents[f"present_value_{i}"] = self.attention(h, i)
            h, residual = self.norm(
                attn, residual, layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm"
            )
            if isinstance(layer.mlp, MoEBlock):
                pending = self.moe(h, layer.mlp, f"{p}.mlp")
            else:
                gate_up, down = swiglu_as_expert(layer.mlp)
                pending = self.experts(h, self.always_one(h), gate_up, down, 1, f"{p}.mlp", dense=True)
        h, _ = self.norm(pending, residual, m.norm.weight, "norm")
        logits = self.output_projection(h)
        return FusedDecoder(self.finish(logits, presents), self.weights)

    # -- pieces --------------------------------------------------------------------------------------------

    def embedding(self) -> str:
        m, q, g = self.model, self.quant, self.graph
        if q is None:
            return g.node("Gather", [g.constant("embed_tokens.weight", m.embed_tokens.weight), "input_ids"], "embed")[0]
        # Quantized: gather rows of a block-quantized table (V, D * bits / 8). Tied, it is the output projection's
        # own bytes, reshaped (one copy for both uses, as onnxruntime-genai does); untied, the embedding's own
        # table at the head's bits.
        if m.lm_head is None:
            table = self.head_table()
            shape = g.constant("embed_tokens.rows_shape", np.array([m.config.vocab_size, -1], np.int64))
            rows = g.node("Reshape", ["lm_head.qweight", shape], "embed.rows")[0]
            scales = "lm_head.scales"
        else:
            table = quantize_blockwise(m.embed_tokens.weight, q.head_bits, q.block_size)
            self.weights["embed_tokens.weight"] = table.dequantized
            rows, scales = g.constant("embed_tokens.qrows", table.rows), g.constant("embed_tokens.scales", table.scales)
        return g.node(
            "GatherBlockQuantized",
            [rows, "input_ids", scales],
            "embed",
            ms=True,
            bits=table.bits,
            block_size=table.block_size,
            gather_axis=0,
            quantize_axis=1,
        )[0]

    def head_table(self) -> BlockQuantized:
        """The output projection quantized, once (a tied embedding reads the same bytes)."""
        if self.head is None:
            m, q = self.model, self.quant
            assert q is not None
            weight = m.embed_tokens.weight if m.lm_head is None else m.lm_head.weight
            self.head = quantize_blockwise(weight, q.head_bits, q.block_size)
            self.graph.constant("lm_head.qweight", self.head.packed)
            self.graph.constant("lm_head.scales", self.head.scales)
            self.weights["embed_tokens.weight" if m.lm_head is None else "lm_head.weight"] = self.head.dequantized
        return self.head

    def norm(self, pending: str, residual: str, weight: torch.Tensor, name: str) -> tuple[str, str]:
        """RMSNorm of residual + pending -> (normed, new residual); the first norm has nothing pending."""
        g, eps = self.graph, self.config.rms_norm_eps
        scale = g.constant(f"{name}.weight", weight)
        if not pending:
            return g.node("SimplifiedLayerNormalization", [residual, scale], name, epsilon=eps, axis=-1, stash_type=1)[
                0
            ], residual
        normed, _, _, summed = g.node(
            "SkipSimplifiedLayerNormalization", [pending, residual, scale], name, 4, ms=True, epsilon=eps
        )
        return normed, summed

    def linear(self, x: str, weight: torch.Tensor, name: str, params: list[str], bits: int | None = None) -> str:
        """x @ weight.T for an nn.Linear weight (N, K), rows `params` stacked: MatMul, or MatMulNBits quantized."""
        g, q = self.graph, self.quant
        if q is None:
            return g.node("MatMul", [x, g.constant(f"{name}.weight_t", weight.t())], name)[0]
        table = quantize_blockwise(weight, bits or q.bits, q.block_size)
        start = 0
        for param in params:  # the stacked rows back to each parameter, for the dequantized twin
            rows = self.model.get_parameter(param).shape[0]
            self.weights[param] = table.dequantized[start : start + rows]
            start += rows
        n, k = weight.shape
        return g.node(
            "MatMulNBits",
            [x, g.constant(f"{name}.qweight", table.packed), g.constant(f"{name}.scales", table.scales)],
            name,
            ms=True,
            K=k,
            N=n,
            bits=table.bits,
            block_size=q.block_size,
            accuracy_level=q.accuracy_level,
        )[0]

    def attention(self, h: str, i: int) -> tuple[str, str, str]:
        c, g = self.config, self.graph
        a = self.model.layers[i].self_attn
        p = f"layers.{i}.self_attn"
        hd, nh, nkv = c.attn_head_dim, c.n_heads, c.n_kv_heads
        qkv_params = [f"{p}.{n}_proj.weight" for n in "qkv"]
        weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0)
        qkv = self.linear(h, weight, f"{p}.qkv_proj", qkv_params)
        cos, sin = self.rotary_caches()
        past = [f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length"]
        if hd % 16 == 0:  # GQA rotates q and k itself (it needs a head size that is a multiple of 16 for that)
            inputs = [qkv, "", "", *past, cos, sin]
            rotary = {"do_rotary": 1, "rotary_interleaved": 1}
        else:
            q, k, v = g.node("Split", [qkv, g.constant("qkv_split", self.qkv_split())], f"{p}.split", 3, axis=-1)
            positions = self.positions()
            q = g.node(
                "RotaryEmbedding", [q, positions, cos, sin], f"{p}.rotary_q", ms=True, interleaved=1, num_heads=nh
            )[0]
            k = g.node(
                "RotaryEmbedding", [k, positions, cos, sin], f"{p}.rotary_k", ms=True, interleaved=1, num_heads=nkv
            )[0]
            inputs, rotary = [q, k, v, *past], {}
        attn, present_key, present_value = g.node(
            "GroupQueryAttention", inputs, f"{p}.attention", 3, ms=True, num_heads=nh, kv_num_heads=nkv, **rotary
        )
        return self.linear(attn, a.o_proj.weight, f"{p}.o_proj", [f"{p}.o_proj.weight"]), present_key, present_value

    def qkv_split(self) -> np.ndarray:
        c = self.config
        return np.array([c.n_heads, c.n_kv_heads, c.n_kv_heads], np.int64) * c.attn_head_dim

    def rotary_caches(self) -> tuple[str, str]:
        """cos/sin (max_seq_len, hd/2) of ERNIE's interleaved RoPE: the model's own (models.moe.rope_cos_sin), whose
        columns repeat each frequency for its pair, one column per pair."""
        c, g = self.config, self.graph
        if "cos_cache" not in g.initializers:
            cos, sin = rope_cos_sin(torch.arange(c.max_seq_len), c.attn_head_dim, c.rope_theta)
            g.constant("cos_cache", cos[:, ::2])
            g.constant("sin_cache", sin[:, ::2])
        return "cos_cache", "sin_cache"

    def positions(self) -> str:
        """position_ids (B, S) = past_len_b + s for the RotaryEmbedding path, from seqlens_k: every row of a call
        has the S new tokens the engine feeds (a prompt alone, or one token per row)."""
        if self.position_ids:
            return self.position_ids
        g = self.graph
        one = g.constant("one_i64", np.array(1, np.int64))
        new = g.node("Shape", ["input_ids"], "positions.new", start=1, end=2)[0]  # (1,): S
        count = g.node("Squeeze", [new], "positions.count")[0]
        steps = g.node("Range", [g.constant("zero_i64", np.array(0, np.int64)), count, one], "positions.steps")[0]
        last = g.node("Cast", ["seqlens_k"], "positions.last", to=TensorProto.INT64)[0]  # past_len + S - 1
        first = g.node("Sub", [g.node("Add", [last, one], "positions.total")[0], new], "positions.first")[0]
        column = g.node("Unsqueeze", [first, g.constant("axis_1", np.array([1], np.int64))], "positions.column")[0]
        self.position_ids = g.node("Add", [column, steps], "position_ids")[0]  # (B, S)
        return self.position_ids

    def always_one(self, h: str) -> str:
        """(T, 1) zero router logits, shared by every one-expert MoE: expert 0 chosen with weight 1."""
        g = self.graph
        if not self.zero_router:
            zeros = g.node(
                "MatMul", [h, g.constant("zero_router", np.zeros((self.config.d_model, 1), np.float32))], "zero_router"
            )[0]
            self.zero_router = g.node(
                "Reshape", [zeros, g.constant("rows_of_1", np.array([-1, 1], np.int64))], "zero_router.rows"
            )[0]
        return self.zero_router

    def moe(self, h: str, block: MoEBlock, p: str) -> str:
        g = self.graph
        e = block.n_experts
        logits = g.node("MatMul", [h, g.constant(f"{p}.gate.weight_t", block.gate.weight.t())], f"{p}.gate")[0]
        logits = g.node(
            "Reshape", [logits, g.constant(f"{p}.rows_of_e", np.array([-1, e], np.int64))], f"{p}.gate.rows"
        )[0]
        router, router_weights = logits, ""
        bias = block.gate.e_score_correction_bias
        if bias.any():
            probs = g.node("Softmax", [logits], f"{p}.gate.softmax", axis=-1)[0]
            biased = g.node("Add", [probs, g.constant(f"{p}.gate.e_score_correction_bias", bias)], f"{p}.gate.biased")[
                0
            ]
            if self.quant is not None:  # QMoE chooses on router_probs and weighs with router_weights
                router, router_weights = biased, probs
            else:  # MoE has no router_weights: the unchosen experts' logits become -inf, so its softmax is ERNIE's
                top, _ = g.node(
                    "TopK",
                    [biased, g.constant(f"{p}.gate.k", np.array([block.top_k], np.int64))],
                    f"{p}.gate.topk",
                    2,
                    axis=-1,
                )
                kth = g.node(
                    "ReduceMin", [top, g.constant("last_axis", np.array([-1], np.int64))], f"{p}.gate.kth", keepdims=1
                )[0]
                chosen = g.node("GreaterOrEqual", [biased, kth], f"{p}.gate.chosen")[0]
                router = g.node(
                    "Where",
                    [chosen, logits, g.constant("minus_inf", np.array(-np.inf, np.float32))],
                    f"{p}.gate.masked",
                )[0]
        out = self.experts(
            h,
            router,
            block.experts.gate_up_proj,
            block.experts.down_proj,
            block.top_k,
            f"{p}.experts",
            router_weights=router_weights,
        )
        if block.shared_experts is None:
            return out
        gate_up, down = swiglu_as_expert(block.shared_experts)
        shared = self.experts(h, self.always_one(h), gate_up, down, 1, f"{p}.shared_experts", dense=True)
        return g.node("Add", [out, shared], f"{p}.plus_shared")[0]

    def experts(
        self,
        x: str,
        router: str,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        k: int,
        p: str,
        router_weights: str = "",
        dense: bool = False,
    ) -> str:
        """MoE (fp32) or QMoE over stacked SwiGLU experts gate_up (E, 2F, D), gate rows first, and down (E, D, F).
        `dense`: a SwiGLU module `p` (gate_proj, up_proj, down_proj) run as one expert."""
        g, q = self.graph, self.quant
        e, f2, d = gate_up.shape
        fc1 = interleave_gate_up(gate_up.detach())
        routing = {
            "k": k,
            "activation_type": "swiglu",
            "swiglu_fusion": 1,
            "normalize_routing_weights": 1,
            "activation_alpha": 1.0,  # silu(gate) * up exactly: gpt-oss's SwiGLU uses 1.702 and beta 1
            "activation_beta": 0.0,
        }
        if q is None:
            inputs = [
                x,
                router,
                g.constant(f"{p}.fc1", fc1),
                g.constant(f"{p}.fc1_bias", np.zeros((e, f2), np.float32)),
                g.constant(f"{p}.fc2", down.detach()),
                g.constant(f"{p}.fc2_bias", np.zeros((e, d), np.float32)),
            ]
            return g.node("MoE", inputs, p, ms=True, **routing)[0]
        fc1_q = [quantize_blockwise(w, q.bits, q.block_size) for w in fc1]
        fc2_q = [quantize_blockwise(w, q.bits, q.block_size) for w in down.detach()]
        gate_up_deq = deinterleave_gate_up(torch.stack([t.dequantized for t in fc1_q]))
        down_deq = torch.stack([t.dequantized for t in fc2_q])
        if dense:
            f = f2 // 2
            self.weights[f"{p}.gate_proj.weight"] = gate_up_deq[0, :f]
            self.weights[f"{p}.up_proj.weight"] = gate_up_deq[0, f:]
            self.weights[f"{p}.down_proj.weight"] = down_deq[0]
        else:
            self.weights[f"{p}.gate_up_proj"] = gate_up_deq
            self.weights[f"{p}.down_proj"] = down_deq
        inputs = [
            x,
            router,
            g.constant(f"{p}.fc1_q", np.stack([t.rows for t in fc1_q])),  # (E, 2F, D * bits / 8)
            g.constant(f"{p}.fc1_scales", np.stack([t.scales for t in fc1_q])),  # (E, 2F, D / block)
            "",
            g.constant(f"{p}.fc2_q", np.stack([t.rows for t in fc2_q])),
            g.constant(f"{p}.fc2_scales", np.stack([t.scales for t in fc2_q])),
            "",
        ]
        if router_weights:  # inputs 8-13 (fc3 and zero points) unused, 14 = router_weights
            inputs += [""] * 6 + [router_weights]
        return g.node(
            "QMoE",
            inputs,
            p,
            ms=True,
            expert_weight_bits=q.bits,
            block_size=q.block_size,
            accuracy_level=q.accuracy_level,
            **routing,
        )[0]

    def output_projection(self, h: str) -> str:
        m, c, q, g = self.model, self.config, self.quant, self.graph
        if q is None and m.lm_head is None:  # tied: onnxruntime folds the Transpose at load; the file holds one table
            table = g.node("Transpose", ["embed_tokens.weight"], "lm_head.transpose", perm=[1, 0])[0]
            return g.node("MatMul", [h, table], "lm_head")[0]
        if q is None:
            return g.node("MatMul", [h, g.constant("lm_head.weight_t", m.lm_head.weight.t())], "lm_head")[0]
        table = self.head_table()
        return g.node(
            "MatMulNBits",
            [h, "lm_head.qweight", "lm_head.scales"],
            "lm_head",
            ms=True,
            K=c.d_model,
            N=c.vocab_size,
            bits=table.bits,
            block_size=q.block_size,
            accuracy_level=q.accuracy_level,
        )[0]

    def finish(self, logits: str, presents: dict[str, str]) -> onnx.ModelProto:
        c, g = self.config, self.graph
        rename = {logits: "logits", **{source: output for output, source in presents.items()}}
        for node in g.nodes:
            for j, name in enumerate(node.output):
                node.output[j] = rename.get(name, name)
        cache = ["batch", c.n_kv_heads, "past_sequence_length", c.attn_head_dim]
        present = ["batch", c.n_kv_heads, "present_sequence_length", c.attn_head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence_length", c.vocab_size])
        ]
        for i in range(c.n_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, cache))
                outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, present))
        initializers = [numpy_helper.from_array(v, k) for k, v in g.initializers.items()]
        graph = helper.make_graph(g.nodes, "trainonce_decoder", inputs, outputs, initializers)
        # No onnx.checker: SimplifiedLayerNormalization is an onnxruntime operator registered in the default domain.
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION,
            producer_name="trainonce",
        )


def build_decoder_graph(model: ElasticMoE, quant: WeightQuant | None = None) -> FusedDecoder:
    """The fused graph of `model` (fp32, or weight-quantized as `quant` says); UnsupportedGraph if its shape cannot
    be expressed."""
    check_fused_graph(model.config, quant)
    with torch.no_grad():
        return _DecoderGraph(model, quant).build()
