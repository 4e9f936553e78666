"""Export stage: the aligned model to ONNX with a KV cache, quantized variants, and the candidate choice.

Each variant (fp32, and INT8/INT4/INT2 weights) is a self-contained chat package. By default its graph is written
from onnxruntime's fused operators (tasks/deploy/fused_graph.py: MatMulNBits and QMoE carry the quantized
weights); `deploy.graph: traced` exports the PyTorch forward instead and quantizes it with onnxruntime's
`quantize_dynamic` (INT8) and `MatMulNBitsQuantizer` (INT4). Each package (serving/engine.py) is measured with
onnxruntime on the same held-out evaluation: file size, validation perplexity, task accuracy, tokens/s.
`DeployConfig` picks which becomes the candidate; the package is registered as a version of `trainonce-chat`
with alias `candidate`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
from tokenizers import Tokenizer

from models.chat_format import ChatFormat, Message
from models.generate import greedy_generate
from models.image_tokenizer import ImageTokenizer
from models.moe import ElasticMoE
from models.onnx_forward import ExportableDecoder, past_names, present_names
from serving.engine import EVERY_TOKEN, MODEL_FILE, TOKENIZER_FILE, ChatPackage, GenerationConfig
from tasks.common.stage_results import OnnxParity
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.deploy.config import DeployConfig, Variant
from tasks.deploy.evaluate import PackageEvaluation, evaluate_package, held_out_examples
from tasks.deploy.fused_graph import build_decoder_graph
from tasks.deploy.graph_limits import variant_quant

_SINGLE_FILE_LIMIT = 1_500_000_000  # bytes of fp32 weights above which ONNX needs external data (2 GB proto cap)


# ---------------------------------------------------------------------------------------------------------
# Export and quantization


def export_onnx(model: ElasticMoE, path: Path, opset: int = 18) -> Path:
    """Export `model` as `(input_ids, pad_lengths, *past) -> (logits, *present)` with dynamic batch, sequence and
    past axes (models/onnx_forward.py)."""
    decoder = ExportableDecoder(model.eval()).eval()
    config = model.config
    n = config.n_layers
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=config.max_seq_len)
    past_len = torch.export.Dim("past_len", min=0, max=config.max_seq_len)
    # Sample sizes > 1 and distinct, so the exporter specialises none of the dynamic axes.
    input_ids = torch.randint(0, config.vocab_size, (2, 5))
    pad_lengths = torch.tensor([0, 2])
    past = tuple(torch.zeros(2, config.n_kv_heads, 3, config.attn_head_dim) for _ in range(2 * n))
    dynamic = ({0: batch, 1: seq}, {0: batch}, tuple({0: batch, 2: past_len} for _ in range(2 * n)))
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(p.numel() for p in decoder.parameters()) * 4 > _SINGLE_FILE_LIMIT
    with torch.no_grad():
        program = torch.onnx.export(
            decoder,
            (input_ids, pad_lengths, *past),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            input_names=["input_ids", "pad_lengths", *past_names(n)],
            output_names=["logits", *present_names(n)],
            optimize=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    # The exporter records intermediate shapes from the sample inputs; onnx's own shape inference (which the
    # quantizers run) disagrees with some, so keep only the graph's declared inputs and outputs.
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(path), save_as_external_data=large, location=f"{path.name}.data")
    return path


def quantize_int8(source: Path, target: Path, per_channel: bool = False) -> Path:
    """INT8 weights, activations quantized on the fly (onnxruntime `quantize_dynamic`), MatMuls only: the
    routers stay fp32 Gemms, since a wrong expert choice costs more than the bytes saved."""
    quantize_dynamic(
        source, target, weight_type=QuantType.QInt8, per_channel=per_channel, op_types_to_quantize=["MatMul"]
    )
    return target


def output_projection(model: onnx.ModelProto) -> str:
    """Name of the MatMul that produces the logits (the output projection)."""
    for node in model.graph.node:
        if "logits" in node.output and node.op_type == "MatMul":
            return node.name
    raise ValueError("the exported graph has no MatMul producing `logits`")


def quantize_int4(source: Path, target: Path, block_size: int, accuracy_level: int, output_bits: int = 8) -> Path:
    """4-bit weight-only, symmetric, per block (onnxruntime `MatMulNBitsQuantizer` -> MatMulNBits), with the
    output projection at `output_bits` (8: weight-only INT8, as llama.cpp's Q4 mixes and ORT GenAI do: at
    tiny scale it is most of the 4-bit perplexity cost)."""

    def config(bits: int) -> DefaultWeightOnlyQuantConfig:
        return DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
            bits=bits,
        )

    model = onnx.load(str(source))
    head = output_projection(model)
    body = MatMulNBitsQuantizer(model, nodes_to_exclude=[head], algo_config=config(4))
    body.process()
    quantized = body.model.model
    rest = MatMulNBitsQuantizer(quantized, algo_config=config(output_bits))  # only the output projection is left
    rest.process()
    rest.model.save_model_to_file(str(target), use_external_data_format=False)
    return target


def write_package(
    model: ElasticMoE,
    tokenizer_path: Path,
    chat_format: ChatFormat,
    directory: Path,
    quantization: str,
    max_new: int,
    image_tokenizer: ImageTokenizer | None = None,
) -> Path:
    """Complete the chat package whose `model.onnx` is in `directory`: tokenizer and generation config (with
    the chat format, so the server renders prompts as SFT did and stops at its end-of-turn token), and the image
    tokenizer of a model that reads and draws images (its codebook: the package works anywhere without the data)."""
    shutil.copy(tokenizer_path, directory / TOKENIZER_FILE)
    if image_tokenizer is not None:
        image_tokenizer.save(directory)
    config = model.config
    GenerationConfig(
        n_layers=config.n_layers,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.attn_head_dim,
        max_seq_len=config.max_seq_len,
        vocab_size=config.vocab_size,
        eos_token_id=chat_format.token_ids(Tokenizer.from_file(str(tokenizer_path)))["end_of_turn"],
        default_max_new_tokens=max_new,
        quantization=quantization,
        chat_format=chat_format.model_dump(mode="json"),
    ).save(directory)
    return directory


def save_graph(proto: onnx.ModelProto, path: Path) -> Path:
    """Write `proto` to `path`, its weights beside it in `<name>.data` when they would pass protobuf's 2 GB cap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(len(t.raw_data) for t in proto.graph.initializer) > _SINGLE_FILE_LIMIT
    onnx.save_model(proto, str(path), save_as_external_data=large, location=f"{path.name}.data")
    return path


def write_fused_graphs(model: ElasticMoE, output: Path, config: DeployConfig) -> None:
    """Each variant's fused graph (tasks/deploy/fused_graph.py), built straight from the PyTorch weights."""
    for variant in _built_variants(config):
        save_graph(build_decoder_graph(model, variant_quant(variant, config)).proto, output / variant / MODEL_FILE)


def write_traced_graphs(model: ElasticMoE, output: Path, config: DeployConfig) -> None:
    """The traced fp32 graph, then each quantized variant rewritten from it by onnxruntime's quantizers."""
    fp32 = export_onnx(model, output / "fp32" / MODEL_FILE, config.opset)
    for variant in _built_variants(config)[1:]:
        target = output / variant / MODEL_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        if variant == "int8":
            quantize_int8(fp32, target, config.int8_per_channel)
        else:  # int4 (DeployConfig refuses int2 for the traced graph)
            quantize_int4(fp32, target, config.int4_block_size, config.int4_accuracy_level, config.int4_output_bits)


def _built_variants(config: DeployConfig) -> list[Variant]:
    return ["fp32", *(v for v in config.variants if v != "fp32")]


def build_packages(
    model: ElasticMoE,
    tokenizer_path: Path,
    chat_format: ChatFormat,
    output: Path,
    config: DeployConfig,
    image_tokenizer: ImageTokenizer | None = None,
) -> dict[str, Path]:
    """fp32 package plus each requested quantized variant, one folder each under `output`, with the graph
    `config.graph` names."""
    model = model.eval()
    if config.graph == "fused":
        write_fused_graphs(model, output, config)
    else:
        write_traced_graphs(model, output, config)
    return {
        variant: write_package(
            model,
            tokenizer_path,
            chat_format,
            output / variant,
            variant,
            config.default_max_new_tokens,
            image_tokenizer,
        )
        for variant in _built_variants(config)
    }


# ---------------------------------------------------------------------------------------------------------
# Choosing the candidate


def within_limits(variant: PackageEvaluation, reference: PackageEvaluation, config: DeployConfig) -> bool:
    ppl_ok = variant.val_ppl <= reference.val_ppl * (1 + config.max_ppl_increase)
    accuracy_ok = variant.accuracy["overall"] >= reference.accuracy["overall"] - config.max_accuracy_drop
    return ppl_ok and accuracy_ok


def choose_candidate(evaluations: dict[str, PackageEvaluation], config: DeployConfig) -> str:
    """The configured variant, or the smallest file within the limits (fp32 always qualifies)."""
    if config.candidate != "smallest_within_limits":
        return config.candidate
    reference = evaluations["fp32"]
    eligible = [v for v, e in evaluations.items() if within_limits(e, reference, config)]
    return min(eligible, key=lambda v: evaluations[v].size_bytes)


PARITY_TOLERANCE = 1e-3  # fp32 export differs by ~1e-6; beyond this something is wrong, not rounding


@torch.no_grad()
def check_parity(model: ElasticMoE, package: ChatPackage, prompts: list[list[int]], new_tokens: int = 16) -> OnnxParity:
    """Compare the fp32 package with the PyTorch model it came from; raises (before anything is registered)
    when the logits differ by more than PARITY_TOLERANCE."""
    generator = package.generator
    tokens = torch.tensor([prompts[0]])
    expected = model(tokens).logits.numpy()
    split = max(1, tokens.shape[1] // 2)
    logits, past = generator.forward(tokens[:, :split].numpy(), generator.empty_past(1))
    steps = [logits]
    for position in range(split, tokens.shape[1]):
        logits, past = generator.forward(tokens[:, position : position + 1].numpy(), past)
        steps.append(logits)
    diff = float(np.abs(np.concatenate(steps, axis=1) - expected).max())
    if diff > PARITY_TOLERANCE:
        raise ValueError(f"ONNX export differs from PyTorch by {diff:.2e} (max abs logit) > {PARITY_TOLERANCE}")
    same = all(
        list(package.complete(p, new_tokens, EVERY_TOKEN).token_ids)
        == greedy_generate(model, torch.tensor([p]), new_tokens)[0, len(p) :].tolist()
        for p in prompts
    )
    return OnnxParity(max_abs_logit_diff=diff, greedy_tokens_equal=same)


@dataclass(frozen=True)
class ExportResult:
    packages: dict[str, Path]
    evaluations: dict[str, PackageEvaluation]
    candidate: str
    parity: OnnxParity


def run_export(
    model: ElasticMoE, data: PreparedData, tasks: TaskMixConfig, config: DeployConfig, output: Path
) -> ExportResult:
    """Build every variant, check the fp32 graph against PyTorch, measure each variant on the held-out
    evaluation, choose the candidate."""
    images = data.images
    image_tokenizer = images.image_tokenizer if images is not None else None
    packages = build_packages(model, data.tokenizer_path, data.chat_format, output, config, image_tokenizer)
    examples = held_out_examples(data, tasks)
    reference = ChatPackage(packages["fp32"])
    first_of_each_task = list({e.task: e for e in reversed(examples)}.values())[::-1]  # image prompts too
    prompts = [reference.chat_prompt([Message(role="user", content=e.prompt)]) for e in first_of_each_task]
    parity = check_parity(model.eval(), reference, prompts)
    evaluations = {v: evaluate_package(p, data, examples, config.evaluation) for v, p in packages.items()}
    return ExportResult(packages, evaluations, choose_candidate(evaluations, config), parity)


def variant_table(result: ExportResult) -> list[str]:
    """Markdown rows: size, perplexity delta, accuracy and speed per variant."""
    reference = result.evaluations["fp32"]
    rows = ["| variant | size (KB) | val ppl | ppl delta | exact match | tokens/s |", "|---|---|---|---|---|---|"]
    for variant, e in result.evaluations.items():
        mark = " (candidate)" if variant == result.candidate else ""
        rows.append(
            f"| {variant}{mark} | {e.size_bytes / 1024:,.0f} | {e.val_ppl:.3f} | "
            f"{e.val_ppl / reference.val_ppl - 1:+.2%} | {e.accuracy['overall']:.3f} | {e.tokens_per_second:,.0f} |"
        )
    return rows
