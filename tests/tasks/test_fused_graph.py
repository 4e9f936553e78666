"""The fused ONNX graph (onnxruntime's GroupQueryAttention, MoE/QMoE, MatMulNBits) computes exactly the PyTorch
model: fp32 logits to 1e-4 over a prefill and 64 cached decode steps on several shapes, greedy tokens identical,
rows of different lengths batched; every quantized variant equals the model holding its dequantized weights; a
shape the operators cannot express is refused naming the field."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from models.config import MoEConfig
from models.generate import greedy_generate
from models.moe import ElasticMoE, MoEBlock
from serving.engine import GenerationConfig, OnnxGenerator
from tasks.deploy.config import DeployConfig
from tasks.deploy.fused_graph import build_decoder_graph
from tasks.deploy.graph_limits import UnsupportedGraph, WeightQuant, check_fused_graph, variant_quant
from tasks.pipeline_config import PipelineConfig

DECODE_STEPS = 64
SHAPES = {
    # top-k 2, every layer MoE with a shared expert, tied output, head size 16 (rotary inside attention)
    "tiny": dict(n_layers=2, n_experts=8, top_k=2, n_shared_experts=1),
    # top-k 1, per-layer expert counts, a dense first layer, two shared experts, untied output
    "dense-first": dict(
        n_layers=3,
        n_experts=6,
        layer_n_experts=(0, 6, 4),
        top_k=1,
        n_shared_experts=2,
        first_dense_layers=1,
        dense_ffn_dim=64,
        tie_embeddings=False,
    ),
    # no shared expert, grouped-query attention 8/2, head size 8 (rotary by RotaryEmbedding, then attention)
    "gqa-head-8": dict(n_layers=2, n_heads=8, n_kv_heads=2, n_experts=4, n_shared_experts=0),
    # head size 32, multi-query attention, a non-zero selection bias (load_balancing: bias)
    "selection-bias": dict(n_layers=2, n_heads=2, n_kv_heads=1, n_experts=8, top_k=2, selection_bias=True),
}


def make_model(shape: str) -> ElasticMoE:
    settings = dict(SHAPES[shape])
    bias = settings.pop("selection_bias", False)
    config = MoEConfig(vocab_size=256, d_model=64, expert_ffn_dim=32, max_seq_len=128, **settings)
    torch.manual_seed(0)
    model = ElasticMoE(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.gate.weight.normal_(0, 0.5)  # routers that discriminate, so a wrong choice shows
                if bias:
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def generator(proto: onnx.ModelProto, config: MoEConfig, tmp_path) -> OnnxGenerator:
    path = tmp_path / "model.onnx"
    onnx.save_model(proto, str(path))
    generation = GenerationConfig(
        n_layers=config.n_layers,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.attn_head_dim,
        max_seq_len=config.max_seq_len,
        vocab_size=config.vocab_size,
        eos_token_id=0,
        default_max_new_tokens=8,
        quantization="test",
    )
    return OnnxGenerator(path, generation, threads=1)


def prefill_then_decode(onnx_model: OnnxGenerator, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """Logits of `tokens` (B, T): the first `prompt` in one call, then one cached step per token."""
    logits, past = onnx_model.forward(tokens[:, :prompt], onnx_model.empty_past(len(tokens)))
    steps = [logits]
    for position in range(prompt, tokens.shape[1]):
        logits, past = onnx_model.forward(tokens[:, position : position + 1], past)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_graph_equals_pytorch_over_prefill_and_64_decode_steps(shape: str, tmp_path) -> None:
    model = make_model(shape)
    onnx_model = generator(build_decoder_graph(model).proto, model.config, tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12 + DECODE_STEPS))
    with torch.no_grad():
        expected = model(tokens).logits.numpy()
    got = prefill_then_decode(onnx_model, tokens.numpy(), prompt=12)
    assert np.abs(got - expected).max() <= 1e-4

    prompt = tokens[:1, :12]
    reference = greedy_generate(model, prompt, DECODE_STEPS)[0, 12:].tolist()
    logits, past = onnx_model.forward(prompt.numpy(), onnx_model.empty_past(1))
    ours = []
    for _ in range(DECODE_STEPS):
        ours.append(int(logits[0, -1].argmax()))
        logits, past = onnx_model.forward(np.array([[ours[-1]]]), past)
    assert ours == reference


@pytest.mark.parametrize("shape", ["tiny", "gqa-head-8"])
def test_rows_of_different_lengths_decode_together_as_alone(shape: str, tmp_path) -> None:
    """Right-padded rows (the fused graph's layout: each row's length fed as seqlens_k) give each row's own logits."""
    model = make_model(shape)
    onnx_model = generator(build_decoder_graph(model).proto, model.config, tmp_path)
    rows = [torch.randint(0, 256, (1, n)) for n in (9, 4)]
    pasts, lengths = [], []
    for row in rows:
        _, past = onnx_model.forward(row.numpy(), onnx_model.empty_past(1))
        pasts.append(past)
        lengths.append(row.shape[1])
    width = max(lengths)
    past = [
        np.concatenate([np.pad(p[i], ((0, 0), (0, 0), (0, width - p[i].shape[2]), (0, 0))) for p in pasts])
        for i in range(len(pasts[0]))
    ]
    steps = torch.randint(0, 256, (2, 6))
    batch_lengths = np.array(lengths, np.int64)
    for step in range(steps.shape[1]):
        logits, past = onnx_model.forward(steps[:, step : step + 1].numpy(), past, batch_lengths)
        batch_lengths = batch_lengths + 1
    for b, row in enumerate(rows):
        with torch.no_grad():
            expected = model(torch.cat([row, steps[b : b + 1]], dim=1)).logits[0, -1].numpy()
        assert np.abs(logits[b, -1] - expected).max() <= 1e-4


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", ["tiny", "dense-first", "selection-bias"])
def test_quantized_graph_computes_the_model_with_its_dequantized_weights(shape: str, bits: int, tmp_path) -> None:
    """At accuracy_level 0 (fp32 activations) MatMulNBits, QMoE and GatherBlockQuantized multiply by exactly the
    dequantized blocks: any packing or layout mistake shows here, long before perplexity would hint at it.
    onnxruntime's block-wise 8-bit experts quantize activations to int8 whatever the level, hence their tolerance."""
    model = make_model(shape)
    fused = build_decoder_graph(model, WeightQuant(bits=bits, head_bits=8, block_size=32, accuracy_level=0))
    onnx_model = generator(fused.proto, model.config, tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = fused.model_with_weights(model)(tokens).logits.numpy()
        full_precision = model(tokens).logits.numpy()
    diff = np.abs(prefill_then_decode(onnx_model, tokens.numpy(), prompt=8) - expected).max()
    assert diff <= (1e-4 if bits == 4 else 2e-2), diff
    assert np.abs(expected - full_precision).max() > 1e-3  # the weights really are quantized
    ops = {node.op_type for node in fused.proto.graph.node}
    assert {"MatMulNBits", "QMoE", "GroupQueryAttention"} <= ops and "MoE" not in ops


def test_a_tied_quantized_model_stores_its_table_once(tmp_path) -> None:
    model = make_model("tiny")
    fused = build_decoder_graph(model, variant_quant("int4", DeployConfig(int4_block_size=32)))
    tables = [t for t in fused.proto.graph.initializer if t.dims and t.dims[0] == model.config.vocab_size]
    assert [t.name for t in tables] == ["lm_head.qweight", "lm_head.scales"]  # the embedding gathers from them
    embed = next(node for node in fused.proto.graph.node if node.name == "embed")
    assert embed.op_type == "GatherBlockQuantized"


def test_a_layer_is_about_ten_kernels() -> None:
    """The traced graph ran ~450 kernels per layer of the tiny preset; every fused node runs once per step."""
    model = make_model("tiny")  # MoE layers with a shared expert, no selection bias
    nodes = build_decoder_graph(model).proto.graph.node
    per_layer = [sum(1 for n in nodes if n.name.startswith(f"layers.{i}.")) for i in range(model.config.n_layers)]
    assert per_layer == [10, 10]  # 2 norms, q|k|v, attention, o_proj, router, reshape, experts, shared experts, Add
    assert len(nodes) <= sum(per_layer) + 6  # embedding, zero router (2), final norm, head (2)


def test_moe_normalizes_even_in_place() -> None:
    """onnxruntime 1.31's fp32 MoE is wrong with normalize_routing_weights=0 when it runs in place (its input has no
    other reader); the graph normalises every MoE. This guards the workaround: if the operator is fixed, both agree."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    fc1 = rng.standard_normal((1, 32, 16)).astype(np.float32)
    fc2 = rng.standard_normal((1, 16, 16)).astype(np.float32)
    gate, up = fc1[0, 0::2] @ x.T, fc1[0, 1::2] @ x.T  # rows interleaved: g0, u0, g1, u1, ...
    expected = (fc2[0] @ (gate / (1 + np.exp(-gate)) * up)).T
    node = helper.make_node(
        "MoE",
        ["x", "router", "fc1", "", "fc2"],
        ["y"],
        domain="com.microsoft",
        k=1,
        activation_type="swiglu",
        swiglu_fusion=1,
        normalize_routing_weights=1,
        activation_alpha=1.0,
        activation_beta=0.0,
    )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["x"]), node],
        "moe",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [5, 16]),
            helper.make_tensor_value_info("router", TensorProto.FLOAT, [5, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 16])],
        [onnx.numpy_helper.from_array(fc1, "fc1"), onnx.numpy_helper.from_array(fc2, "fc2")],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": x, "router": np.zeros((5, 1), np.float32)})
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("model", "deploy", "field"),
    [
        (dict(d_model=48, n_heads=4), {}, "head_dim=12"),  # GroupQueryAttention needs a multiple of 8
        (dict(d_model=64, expert_ffn_dim=80), {}, "int4_block_size=64 must divide the model's expert_ffn_dim=80"),
        (dict(d_model=64, expert_ffn_dim=80), {"variants": ["fp32"]}, None),  # fp32 has no blocks
        (dict(d_model=48, n_heads=4), {"graph": "traced"}, None),
    ],
)
def test_a_shape_the_fused_graph_cannot_express_is_refused_before_training(model, deploy, field) -> None:
    settings = {"pretrain": {"model": model}, "deploy": deploy}
    if field is None:
        PipelineConfig.model_validate(settings)
        return
    with pytest.raises(ValueError, match=field) as refused:
        PipelineConfig.model_validate(settings)
    assert "deploy.graph: traced" in str(refused.value)
    with pytest.raises(UnsupportedGraph, match=field):
        check_fused_graph(MoEConfig(**model), variant_quant("int4", DeployConfig()))


@functools.cache
def onnxruntime_has_a_gpu() -> bool:
    """Whether onnxruntime's CUDA provider really runs here (onnxruntime-gpu lists it on every machine, and a session
    asked for it falls back to the CPU when no device is present)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    one_node = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 18)],
    )
    try:
        session = ort.InferenceSession(one_node.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception:  # no CUDA runtime or device
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.skipif("not onnxruntime_has_a_gpu()", reason="no CUDA device for onnxruntime here")
@pytest.mark.parametrize("quant", [None, WeightQuant(bits=4, head_bits=8, block_size=32, accuracy_level=0)])
@pytest.mark.parametrize("shape", ["tiny", "dense-first"])
def test_the_same_graph_runs_on_cuda(shape: str, quant: WeightQuant | None) -> None:
    """onnxruntime-gpu is the declared runtime: the graph the deploy stage writes runs on its CUDA provider too."""
    model = make_model(shape)
    fused = build_decoder_graph(model, quant)
    session = ort.InferenceSession(fused.proto.SerializeToString(), providers=["CUDAExecutionProvider"])
    config = model.config
    tokens = torch.randint(0, config.vocab_size, (1, 24))
    empty = np.zeros((1, config.n_kv_heads, 0, config.attn_head_dim), np.float32)
    feeds = {
        "input_ids": tokens.numpy(),
        "seqlens_k": np.array([23], np.int32),
        "total_sequence_length": np.array(24, np.int32),
        **{f"past_{kind}_{i}": empty for i in range(config.n_layers) for kind in ("key", "value")},
    }
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = (model if quant is None else fused.model_with_weights(model))(tokens).logits.numpy()
    assert np.abs(logits - expected).max() <= (1e-3 if quant is None else 2e-2)  # TF32 and fused CUDA kernels
