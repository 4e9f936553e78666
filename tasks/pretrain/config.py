"""The pre-training stage's settings (`pretrain:` in a preset) and what a pre-training run returns.

A run's identity (`PretrainConfig.config_hash`) names its checkpoints, cache entries and registry tags, so that a
changed setting never resumes from another run's weights; settings added later at the value that reproduces the
earlier runs are left out of it (`LATER_DEFAULTS`), so adding a setting never orphans a checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.config import MoEConfig
from models.subnet import ElasticSpace
from tasks.common.launch import LaunchConfig
from tasks.common.optim import OptimConfig
from tasks.common.settings import with_defaults

# Settings added after runs were saved, with the value that reproduces how those runs trained: at that value they
# are left out of a run's identity (PretrainConfig.config_hash), so adding a setting never orphans a checkpoint.
LATER_DEFAULTS: dict[str, dict[str, object]] = {
    "sampling": {"elastic_end": 1.0},
    "model": {"routing": "shared", "image_token_range": None, "n_image_experts": 0, "orthogonal_loss_coef": 0.0},
}


PROGRESSIVE_ORDER = ("top_k", "experts", "depth")


def dimension_values(space: ElasticSpace, dimension: str) -> tuple[int, ...]:
    """The values an elastic dimension (PROGRESSIVE_ORDER's names) takes in `space`."""
    return {"top_k": space.top_ks, "experts": space.expert_counts, "depth": space.depths}[dimension]


class SamplingConfig(BaseModel):
    """Which sub-models train at each step, and how much each one's loss counts."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["full", "random", "sandwich"] = Field(
        "sandwich",
        description="`full`: only the full model (baseline); `random`: full + one random sub-model (ERNIE 5.0); "
        "`sandwich`: largest + smallest + n_random random sub-models (BigNAS / Universally Slimmable Networks).",
    )
    n_random: int = Field(1, ge=0, le=16, description="Random sub-models per step under `sandwich`.")
    distill_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Weight of in-place distillation from the full model's logits under `sandwich` "
        "(Once-for-All, BigNAS: 1.0).",
    )
    distill_temperature: float = Field(1.0, gt=0, le=20, description="Softmax temperature of distillation.")
    subnet_lm_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Weight of each sub-model's own next-token loss; the full model's is 1. Below 1 favours the "
        "full model (Nemotron Elastic); 0 with distill_weight > 0 trains sub-models on distillation alone "
        "(BigNAS).",
    )
    elastic_start: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of the run the full model trains alone before any sub-model joins (delayed "
        "shrinking; DepS finds about 0.5 best). 0: from the first step.",
    )
    ramp: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of the run, from elastic_start on, over which the sub-models' loss weights rise "
        "linearly from 0 to their values. 0: at once.",
    )
    elastic_end: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of the run after which the full model trains alone again, so the end of the "
        "schedule, where the learning rate is lowest, anneals the full model without the sub-models' pull on the "
        "shared weights (extraction's distillation then adapts each member to the final weights). 1: sub-models "
        "train to the last step.",
    )
    dimension_order: Literal["together", "progressive"] = Field(
        "together",
        description="`together`: every elastic dimension opens at elastic_start; `progressive`: top-k, then "
        "expert count, then depth open one after another, each after an equal share of the elastic phase "
        "(Once-for-All's progressive shrinking).",
    )
    size_skew: float = Field(
        0.0,
        ge=0,
        le=8,
        description="Random sub-models draw each dimension's i-th smallest value with probability proportional "
        "to (i + 1)^size_skew: 0 is uniform, larger favours bigger members (Nemotron Elastic's second stage).",
    )
    project_conflicts: bool = Field(
        False,
        description="Gradient surgery in favour of the full model (NASViT): per weight tensor, the part of the "
        "sub-models' gradient that points against the full model's is removed, so they never undo its step. "
        "One process only.",
    )
    elastic_lr: float | None = Field(
        None,
        gt=0,
        le=10,
        description="Peak learning rate of a fresh warm-up + cosine schedule over the elastic phase, as a "
        "fraction of optim.lr (elastify a trained parent, as Flextron and Nemotron Elastic do). None: one "
        "schedule over the whole run.",
    )

    @model_validator(mode="after")
    def _check_phases(self) -> SamplingConfig:
        if self.elastic_start + self.ramp > 1:
            raise ValueError(f"elastic_start={self.elastic_start} + ramp={self.ramp} must be <= 1")
        if self.elastic_end < 1 and self.elastic_start + self.ramp >= self.elastic_end:
            raise ValueError(
                f"elastic_end={self.elastic_end} must be > elastic_start + ramp = {self.elastic_start + self.ramp}: "
                "the sub-models need an elastic phase at full weight before the full model's last one"
            )
        elastic = self.elastic_start or self.ramp or self.elastic_lr is not None or self.elastic_end < 1
        if self.policy == "full" and elastic:
            raise ValueError(
                "policy=full trains no sub-model: elastic_start, ramp, elastic_end and elastic_lr need another policy"
            )
        return self

    def elastic_start_step(self, total_steps: int) -> int:
        """First step at which sub-models train (total_steps when none ever does)."""
        if self.policy == "full":
            return total_steps
        return min(total_steps, math.ceil(self.elastic_start * total_steps))

    def elastic_end_step(self, total_steps: int) -> int:
        """First step after the elastic phase: the full model trains alone from here to the end."""
        return min(total_steps, math.ceil(self.elastic_end * total_steps))

    def subnet_scale(self, step: int, total_steps: int) -> float:
        """Multiplier of every sub-model loss at `step`: 0 before elastic_start, then a linear ramp to 1, and 0
        again from elastic_end on."""
        start = self.elastic_start_step(total_steps)
        if step < start or step >= self.elastic_end_step(total_steps):
            return 0.0
        ramp_steps = math.ceil(self.ramp * total_steps)
        return 1.0 if ramp_steps == 0 else min(1.0, (step - start + 1) / ramp_steps)

    def open_dimensions(self, space: ElasticSpace, step: int, total_steps: int) -> tuple[str, ...]:
        """The elastic dimensions sub-models may shrink at `step` (the others stay at their largest value)."""
        start = self.elastic_start_step(total_steps)
        if step < start:
            return ()
        elastic = tuple(d for d in PROGRESSIVE_ORDER if len(dimension_values(space, d)) > 1)
        if self.dimension_order == "together" or not elastic:
            return elastic
        stage = (step - start) * len(elastic) // max(1, self.elastic_end_step(total_steps) - start)
        return elastic[: stage + 1]


# The tiny preset's supernet and family (models/ and SamplingConfig keep their own generic defaults): a 1.4 M-
# parameter (367 k active) ERNIE-4.5-MoE that trains at a few steps per second on 2 cores, shaped so that ERNIE
# 5.1's cut (<= 34% of the parameters, <= 50% active) exists in it, trained as nested, importance-ordered prefixes
TINY_MODEL = MoEConfig(vocab_size=1024, n_layers=6, n_experts=16, max_seq_len=256)
TINY_ELASTIC = ElasticSpace(
    depths=(3, 4, 5, 6), expert_counts=(4, 8, 12, 16), layer_sampling="nested", expert_sampling="nested"
)
# ... and its recipe (docs/claim.md: nested_delayed_kd_anneal): the full model alone for the first half and the last
# 10%, the sub-model losses ramped in over 10% of the run, their own LM loss at 0.3 beside in-place distillation
TINY_SAMPLING = SamplingConfig(subnet_lm_weight=0.3, elastic_start=0.5, ramp=0.1, elastic_end=0.9)


class PretrainConfig(BaseModel):
    """Everything the pre-training stage needs besides the prepared data."""

    model_config = ConfigDict(extra="forbid")

    model: with_defaults(TINY_MODEL) = Field(
        default_factory=TINY_MODEL.model_copy, description="Supernet shape and routing."
    )
    elastic: with_defaults(TINY_ELASTIC) = Field(
        default_factory=TINY_ELASTIC.model_copy, description="The sub-model family trained."
    )
    sampling: with_defaults(TINY_SAMPLING) = Field(
        default_factory=TINY_SAMPLING.model_copy, description="Sub-models per step."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    batch_size: int = Field(
        16,
        ge=1,
        le=65_536,
        description="Sequences per micro-batch over all processes, split evenly across them: the same config trains "
        "on the same batches with 1 process or N (it must be a multiple of N).",
    )
    seq_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimiser step.")
    max_steps: int | None = Field(
        300, ge=1, le=10_000_000, description="Budget in optimiser steps (set this or max_tokens, not both)."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=10**15, description="Budget in training tokens over all processes (instead of max_steps)."
    )
    warm_start: Literal["never", "on_new_data"] = Field(
        "on_new_data",
        description="on_new_data: when the latest registered supernet has this architecture but was trained on "
        "other data (a retrain), start from its weights and tokenizer; never: always from scratch.",
    )
    warm_start_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Steps of continued pre-training when warm-starting (None: max_steps)."
    )
    precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate mixed precision: `no` (fp32, CPU), `bf16` (GPU)."
    )
    log_interval: int = Field(10, ge=1, le=1_000_000, description="Steps between train-metric logs.")
    eval_interval: int = Field(50, ge=1, le=1_000_000, description="Steps between validations of the panel.")
    eval_batches: int = Field(4, ge=1, le=10_000, description="Validation batches per evaluated sub-model.")
    eval_panel_size: int = Field(
        2, ge=0, le=64, description="Sub-models validated between the smallest and the largest."
    )
    checkpoint_interval: int = Field(
        100, ge=1, le=1_000_000, description="Steps between resumable checkpoints (accelerate save_state)."
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Newest checkpoints kept on disk.")
    rerank_interval: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Steps between re-measuring layer/expert importance on training batches, so the sandwich's "
        "`smallest` and nested sampling follow the current importance order (None: keep the identity order).",
    )
    rerank_batches: int = Field(4, ge=1, le=10_000, description="Training batches per importance re-ranking.")
    peak_tflops: float | None = Field(
        None, gt=0, le=100_000, description="Device peak for MFU; default: known GPU bf16 peak or measured CPU."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of weights, batches and sub-model sampling.")
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig,
        description="Processes that train (accelerate launch); not part of the run's identity: the batches are the "
        "same with any process count.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> PretrainConfig:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        try:
            self.elastic.check_fits(self.model)
        except ValueError as error:
            raise ValueError(f"elastic: {error}") from error
        if self.launch.sharding == "fsdp2" and self.precision == "fp16":
            raise ValueError(
                "precision=fp16 with launch.sharding=fsdp2: fp16 needs a gradient scaler, which sharded training "
                "does not have here; use bf16 or no"
            )
        if self.max_steps is not None and 1 < self.max_steps <= self.optim.warmup_steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be < max_steps={self.max_steps}")
        return self

    def tokens_per_step(self) -> int:
        """Training tokens per optimiser step over all processes."""
        return self.batch_size * self.seq_len * self.grad_accum

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.max_tokens / self.tokens_per_step()))  # type: ignore[operator]

    def rows_of_process(self, num_processes: int, process_index: int) -> slice:
        """This process's share of every micro-batch; a clear error when the batch does not split evenly."""
        if self.batch_size % num_processes:
            raise ValueError(
                f"pretrain.batch_size={self.batch_size} must be a multiple of the {num_processes} processes "
                "(it is the batch over all of them)"
            )
        share = self.batch_size // num_processes
        return slice(process_index * share, (process_index + 1) * share)

    def identity_exclude(self) -> dict[str, Any]:
        """What a run's identity leaves out: how it is launched, and settings added after runs were saved while
        they hold the value that reproduces the earlier behaviour (LATER_DEFAULTS), so that those runs'
        checkpoints, caches and tags stay valid."""
        exclude: dict[str, Any] = {"launch": True}
        for section, fields in LATER_DEFAULTS.items():
            at_default = {name for name, value in fields.items() if getattr(getattr(self, section), name) == value}
            if at_default:
                exclude[section] = at_default
        return exclude

    def config_hash(self, data_fingerprint: str) -> str:
        """Identity of a run: this config on that data. Checkpoints and registry tags carry it."""
        identity = self.model_dump_json(exclude=self.identity_exclude())
        return hashlib.sha256((identity + data_fingerprint).encode()).hexdigest()


@dataclass(frozen=True)
class PretrainResult:
    checkpoint_dir: Path  # the final supernet (safetensors + config.json)
    steps: int
    resumed_from: int  # 0 for a fresh run
    train_loss: float  # full-model LM loss of the last step
    val_loss: dict[str, float]  # last validation, per panel label
    tokens_per_second: float
    mfu: float
    config_hash: str
    mlflow_run_id: str | None
    loss_curve: Path | None = None
    processes: int = 1  # processes that trained, over all machines (accelerate's count)
    image_val_loss: dict[str, float] = field(default_factory=dict)  # last validation on held-out image documents
    modality_routing: dict | None = None  # ModalityRouting of the full model (tasks/pretrain/modality_routing.py)


# The order in which progressive shrinking opens the elastic dimensions: the least structural first
# (routing fewer experts changes no weight), depth last (skipping a layer changes every later layer's input).
