"""ONNX export with KV cache: onnxruntime equals PyTorch; quantized variants; choosing the candidate."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from models.chat_format import Message
from models.generate import greedy_generate
from models.moe import ElasticMoE
from serving.engine import EVERY_TOKEN, MODEL_FILE, ChatPackage
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.deploy.config import DeployConfig, EvaluationConfig
from tasks.deploy.evaluate import PackageEvaluation, evaluate_package, held_out_examples
from tasks.deploy.onnx_export import check_parity, choose_candidate


def _ops(package: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(package / MODEL_FILE)).graph.node)


def _weight_matmuls(package: Path) -> int:
    """MatMuls whose right operand is a stored weight (the attention score/value MatMuls are not)."""
    graph = onnx.load(str(package / MODEL_FILE)).graph
    weights = {init.name for init in graph.initializer}
    return sum(1 for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights)


def test_onnxruntime_logits_equal_pytorch_for_prefill_and_cached_steps(chat_model, chat_packages) -> None:
    generator = ChatPackage(chat_packages["fp32"]).generator
    tokens = torch.randint(0, chat_model.config.vocab_size, (3, 17))  # batch and length unlike the export sample
    with torch.no_grad():
        expected = chat_model(tokens).logits.numpy()
    logits, past = generator.forward(tokens[:, :9].numpy(), generator.empty_past(3))
    steps = [logits]
    for position in range(9, 17):
        logits, past = generator.forward(tokens[:, position : position + 1].numpy(), past)
        steps.append(logits)
    diff = np.abs(np.concatenate(steps, axis=1) - expected).max()
    assert diff <= 1e-4, f"max |logit diff| {diff}"
    assert past[0].shape == (3, chat_model.config.n_kv_heads, 17, chat_model.config.attn_head_dim)


def test_greedy_generation_matches_pytorch(chat_model: ElasticMoE, chat_packages) -> None:
    package = ChatPackage(chat_packages["fp32"])
    for prompt_text in ("To be, or not to be", "KING HENRY"):
        prompt = package.text_prompt(prompt_text)
        ours = list(package.complete(prompt, 24, EVERY_TOKEN).token_ids)
        reference = greedy_generate(chat_model, torch.tensor([prompt]), 24)[0, len(prompt) :].tolist()
        assert ours == reference


def test_quantized_variants_are_smaller_and_close(chat_model, chat_packages) -> None:
    """The fused graphs carry every large matrix in MatMulNBits and QMoE; the routers stay fp32 MatMuls."""
    n_moe = len(chat_model.config.moe_layers)
    for variant, bits in (("int8", 8), ("int4", 4)):
        ops = _ops(chat_packages[variant])
        assert ops["QMoE"] == n_moe * (1 + (chat_model.config.n_shared_experts > 0)) and ops["MoE"] == 0
        assert ops["MatMulNBits"] == 2 * chat_model.config.n_layers + 1  # q|k|v and o_proj per layer, and the head
        assert _weight_matmuls(chat_packages[variant]) == n_moe + 1  # routers, and the shared experts' zero router
        graph = onnx.load(str(chat_packages[variant] / MODEL_FILE)).graph
        attributes = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node}
        assert attributes["lm_head"]["bits"] == 8 and attributes["layers.0.self_attn.o_proj"]["bits"] == bits
    sizes = {v: (p / MODEL_FILE).stat().st_size for v, p in chat_packages.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    tokens = torch.randint(0, chat_model.config.vocab_size, (4, 32)).numpy()
    reference = ChatPackage(chat_packages["fp32"]).generator
    for variant in ("int8", "int4"):
        generator = ChatPackage(chat_packages[variant]).generator
        quantized, _ = generator.forward(tokens, generator.empty_past(4))
        full, _ = reference.forward(tokens, reference.empty_past(4))
        agreement = (quantized.argmax(-1) == full.argmax(-1)).mean()
        assert agreement > 0.8, f"{variant}: top-1 agreement {agreement}"


def test_the_traced_graph_stays_available_for_shapes_the_fused_one_cannot_express(chat_model, traced_packages) -> None:
    """`deploy.graph: traced`: the PyTorch forward through torch.onnx, quantized by onnxruntime's quantizers."""
    assert _ops(traced_packages["int8"])["MatMulInteger"] > 0
    assert _ops(traced_packages["int4"])["MatMulNBits"] > 0
    assert _weight_matmuls(traced_packages["int4"]) == _weight_matmuls(traced_packages["int8"]) == 0  # all quantized
    assert _ops(traced_packages["fp32"])["Gemm"] == chat_model.config.n_layers  # routers stay fp32
    package = ChatPackage(traced_packages["fp32"])
    assert package.generator.pads_left and not package.generator.takes_lengths
    prompts = [package.chat_prompt([Message(role="user", content=t)]) for t in ("Repeat: a b", "Sort: c a")]
    parity = check_parity(chat_model, package, prompts)
    assert parity.max_abs_logit_diff <= 1e-4 and parity.greedy_tokens_equal


def test_evaluation_measures_every_figure(chat_packages, small_data: PreparedData) -> None:
    examples = held_out_examples(small_data, TaskMixConfig(test_per_task=2))
    config = EvaluationConfig(val_batches=2, batch_size=2, seq_len=32, speed_prompts=1, speed_new_tokens=8)
    evaluation = evaluate_package(chat_packages["fp32"], small_data, examples, config)
    assert 1 < evaluation.val_ppl < 400  # trained: better than a uniform guess over the vocabulary
    assert set(evaluation.accuracy) == {"arithmetic", "copy", "reverse", "sort", "span", "overall"}
    assert evaluation.tokens_per_second > 0 and evaluation.size_bytes > 0
    again = evaluate_package(chat_packages["fp32"], small_data, examples, config)
    assert again.val_nll == evaluation.val_nll  # fixed windows: comparable across variants and runs


def test_chat_prompt_is_the_sft_template(chat_packages, small_data: PreparedData) -> None:
    package = ChatPackage(chat_packages["fp32"])
    messages = [Message(role="system", content="Be brief."), Message(role="user", content="Repeat: a b")]
    assert package.chat_prompt(messages) == small_data.chat_tokenizer().render(messages, True)[0]


def _evaluation(ppl: float, accuracy: float, size: int) -> PackageEvaluation:
    return PackageEvaluation(float(np.log(ppl)), ppl, {"overall": accuracy}, 100.0, size)


def test_candidate_is_the_smallest_within_limits() -> None:
    evaluations = {
        "fp32": _evaluation(10.0, 0.5, 300),
        "int8": _evaluation(10.1, 0.5, 100),
        "int4": _evaluation(10.5, 0.5, 60),
    }
    assert choose_candidate(evaluations, DeployConfig(max_ppl_increase=0.02)) == "int8"  # int4 is +5%
    assert choose_candidate(evaluations, DeployConfig(max_ppl_increase=0.06)) == "int4"
    evaluations["int4"] = _evaluation(10.0, 0.4, 60)
    assert choose_candidate(evaluations, DeployConfig(max_ppl_increase=0.06, max_accuracy_drop=0.05)) == "int8"
    assert choose_candidate(evaluations, DeployConfig(candidate="int4")) == "int4"


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"int4_block_size": 48}, "int4_block_size"),
        ({"variants": ("fp32",), "candidate": "int4"}, "candidate"),
        ({"opset": 12}, "opset"),
        ({"max_ppl_increase": -0.1}, "max_ppl_increase"),
    ],
)
def test_bad_deploy_config_names_the_field(update: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        DeployConfig(**update)


def test_export_stage_parity_check_refuses_a_wrong_graph(chat_model: ElasticMoE, chat_packages) -> None:
    package = ChatPackage(chat_packages["fp32"])
    prompts = [package.chat_prompt([Message(role="user", content=t)]) for t in ("Repeat: a b", "Sort: c a")]
    parity = check_parity(chat_model, package, prompts)
    assert parity.max_abs_logit_diff <= 1e-4 and parity.greedy_tokens_equal
    other = ElasticMoE(chat_model.config).eval()  # different weights: the graph is not this model's
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check_parity(other, package, prompts)
