"""The deploy stage's settings (`deploy:` in a preset): which ONNX variants to build, how the candidate is chosen
among them, the exports beside ONNX, and the held-out measurement (tasks/deploy/evaluate.py's EvaluationConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from registry.names import CHAT_MODEL
from tasks.deploy.llama_cpp import GGUF_TYPES, GgufType

Variant = Literal["fp32", "int8", "int4", "int2"]


class EvaluationConfig(BaseModel):
    """What every deployable is measured on (the same for all variants and for candidate vs champion)."""

    model_config = ConfigDict(extra="forbid")

    val_batches: int = Field(8, ge=1, le=10_000, description="Validation windows batches for perplexity.")
    batch_size: int = Field(8, ge=1, le=4096, description="Windows per validation batch.")
    seq_len: int = Field(128, ge=2, le=1_048_576, description="Tokens per validation window.")
    seed: int = Field(12345, ge=0, le=2**31 - 1, description="Seed that picks the validation windows.")
    max_new_tokens: int = Field(32, ge=1, le=65_536, description="Longest reply to a held-out task prompt.")
    speed_prompts: int = Field(4, ge=1, le=1000, description="Prompts whose greedy decoding is timed.")
    speed_new_tokens: int = Field(64, ge=1, le=65_536, description="Tokens generated per timed prompt.")
    threads: int = Field(2, ge=1, le=1024, description="onnxruntime intra-op threads for the speed figure.")


class DeployConfig(BaseModel):
    """Which ONNX variants to build and how the candidate is chosen among them."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(
        CHAT_MODEL,
        pattern=r"^[A-Za-z0-9][\w.-]{0,99}$",
        description="Registered model the candidate joins and the gate promotes in (family members: "
        "trainonce-chat-<member>, set by the pipeline's `family`).",
    )
    graph: Literal["fused", "traced"] = Field(
        "fused",
        description="`fused`: the graph written from onnxruntime's fused LLM operators (GroupQueryAttention, MoE/QMoE, "
        "MatMulNBits; tasks/deploy/fused_graph.py), several times faster to decode; `traced`: the PyTorch forward "
        "traced by torch.onnx (models/onnx_forward.py), for a shape the fused operators cannot express (a head size "
        "that is not a multiple of 8).",
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the traced graph (the fused graph uses 18).")
    variants: tuple[Variant, ...] = Field(
        ("fp32", "int8", "int4"),
        min_length=1,
        description="Variants to build; fp32 is always built (reference). int2 (2-bit weights, fused graph only) is "
        "for comparison: at small scale it is expected to fail the perplexity limit.",
    )
    int4_block_size: int = Field(
        64,
        ge=16,
        le=256,
        description="Weights per quantization block (a power of two that divides every matrix's input size): every "
        "variant of the fused graph, INT4 of the traced one. 64 measured smaller and no worse than 32 on the tiny "
        "champion (INT4 307 vs 334 KB, perplexity +1.03% vs +1.33%); each block carries an fp32 scale.",
    )
    int4_output_bits: Literal[4, 8] = Field(
        8,
        description="Bits of the output projection (and of a tied embedding, which shares its bytes in the fused "
        "graph) in the INT4 and INT2 variants: 8 costs little size and saves perplexity.",
    )
    int8_per_channel: bool = Field(
        False,
        description="Traced graph only: per-channel INT8 weight scales (per-tensor measured better on the tiny model).",
    )
    int4_accuracy_level: int = Field(
        4,
        ge=0,
        le=4,
        description="MatMulNBits / QMoE compute type: 0 = fp32 activations, 4 = int8 activations (fastest). "
        "onnxruntime's block-wise 8-bit experts always use int8 activations.",
    )
    candidate: Literal["smallest_within_limits", "fp32", "int8", "int4", "int2"] = Field(
        "smallest_within_limits",
        description="Fixed variant, or the smallest whose perplexity and accuracy stay within the limits below.",
    )
    max_ppl_increase: float = Field(
        0.02, ge=0.0, le=10.0, description="Largest relative validation perplexity increase vs fp32 (0.02 = +2%)."
    )
    max_accuracy_drop: float = Field(
        0.02, ge=0.0, le=1.0, description="Largest drop in held-out exact match vs fp32 (absolute)."
    )
    default_max_new_tokens: int = Field(64, ge=1, le=65_536, description="Reply length when a request sets none.")
    hugging_face: bool = Field(
        True,
        description="Also register the aligned model as a transformers directory (`trainonce-chat-hf`, MLflow "
        "transformers flavor) for transformers, vLLM, SGLang and FastDeploy.",
    )
    gguf: tuple[GgufType, ...] = Field(
        (),
        description=f"Also write these GGUF types for llama.cpp and Ollama ({', '.join(GGUF_TYPES)}), with an Ollama "
        "Modelfile, logged as an `export-gguf` run's artifacts; needs `make llama-cpp`. Empty: none.",
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Held-out measurement.")

    @model_validator(mode="after")
    def _check(self) -> DeployConfig:
        if self.int4_block_size & (self.int4_block_size - 1):
            raise ValueError(f"int4_block_size={self.int4_block_size} must be a power of two in [16, 256]")
        if self.graph == "traced" and "int2" in self.variants:
            raise ValueError("variants: int2 needs graph=fused (the traced graph has no 2-bit quantizer)")
        if self.candidate not in ("smallest_within_limits", *self.variants):
            raise ValueError(f"candidate={self.candidate!r} is not among variants={list(self.variants)}")
        return self
