"""Extraction stage: cut the chosen sub-model out of the ranked supernet, distil it briefly from the supernet.

The supernet arrives ranked (tasks.importance_calibration), so "the n most important" sub-models keep what
matters. The chosen spec is extracted as a standalone model (`extract_subnet`: exact) and, optionally,
trained further with KL to the supernet's logits plus CE, for a compute budget expressed as a fraction of
what pre-training that architecture from scratch on the supernet's tokens would cost (default 6%, the
share ERNIE 5.1 reports).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from models.accounting import subnet_cost
from models.checkpoint import load_model, save_model
from models.extract import extract_subnet
from models.losses import DistillationTarget, causal_lm_loss, distillation_loss
from models.moe import ElasticMoE
from models.subnet import SubnetSpec
from registry.models import SUBNET_MODEL, SUPERNET_MODEL, register_checkpoint
from registry.tracking import RunLogger, git_commit
from tasks.data import PreparedData, sample_batch
from tasks.optim import short_run_schedule
from tasks.stage_results import ExtractedSubnet, SubnetAchieved, SubnetBudget
from tasks.throughput import training_flops
from tasks.validation_panel import evaluate_panel


class ExtractConfig(BaseModel):
    """Post-extraction distillation from the supernet's logits."""

    model_config = ConfigDict(extra="forbid")

    distill: bool = Field(True, description="Continue training the extracted model from the supernet's logits.")
    distill_compute_fraction: float = Field(
        0.06,
        gt=0,
        le=10,
        description="Distillation compute as a fraction of pre-training this architecture from scratch on the "
        "supernet's token count (ERNIE 5.1: about 6%).",
    )
    kd_weight: float = Field(1.0, ge=0, le=100, description="Weight of KL(supernet || sub-model) on logits.")
    ce_weight: float = Field(1.0, ge=0, le=100, description="Weight of the next-token cross entropy.")
    temperature: float = Field(1.0, gt=0, le=20, description="Softmax temperature of the distillation KL.")
    lr: float = Field(
        3e-4,
        gt=0,
        le=1,
        description="Peak learning rate of distillation (AdamW, cosine). About 1/10 of pre-training's: in the claim "
        "benchmark 1e-3 first undid what the cut had learned, 3e-4 improved it from the first step (docs/claim.md).",
    )
    warmup_steps: int = Field(5, ge=0, le=1_000_000, description="Linear warm-up steps of distillation.")
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm; larger steps are scaled down.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Sequences per distillation batch.")
    seq_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per distillation sequence.")
    eval_batches: int = Field(4, ge=1, le=10_000, description="Validation batches before/after distillation.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of distillation batches.")


def student_val_loss(student: ElasticMoE, data: PreparedData, config: ExtractConfig) -> float:
    """Validation LM loss of a standalone model on the fixed batches every stage compares on."""
    device = next(student.parameters()).device
    shape = (config.batch_size, config.seq_len, config.eval_batches, device)
    return evaluate_panel(student, {"student": None}, data.split("val"), *shape)["student"]


@dataclass(frozen=True)
class DistillResult:
    steps: int
    compute_fraction: float  # distillation FLOPs / from-scratch pre-training FLOPs of this architecture
    val_loss_before: float
    val_loss_after: float
    # (compute fraction, validation loss) at the fractions asked for with `curve_at`: how the loss falls with budget
    curve: tuple[tuple[float, float], ...] = ()


def distill_subnet(
    student: ElasticMoE,
    teacher: ElasticMoE,
    data: PreparedData,
    config: ExtractConfig,
    pretrain_tokens: int,
    curve_at: tuple[float, ...] = (),
) -> DistillResult:
    """Train `student` with KL to `teacher` plus CE for `distill_compute_fraction` of its from-scratch cost.

    From-scratch cost = 3 x forward FLOPs x `pretrain_tokens` of the student's architecture; one distillation
    step costs the student's forward + backward and the teacher's forward on the same batch. `curve_at` lists
    compute fractions (within the budget) at which the validation loss is also measured: one run gives the
    budget curve (under this run's learning-rate schedule, which spans the whole budget).
    """
    device = next(student.parameters()).device
    tokens_per_step = config.batch_size * config.seq_len
    scratch = training_flops(student.config, [None], config.seq_len, pretrain_tokens)
    teacher_forward = training_flops(teacher.config, [None], config.seq_len, tokens_per_step) / 3
    per_step = training_flops(student.config, [None], config.seq_len, tokens_per_step) + teacher_forward
    steps = int(config.distill_compute_fraction * scratch // per_step)
    before = student_val_loss(student, data, config)
    if steps == 0:
        return DistillResult(0, 0.0, before, before)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    factor = short_run_schedule(config.warmup_steps, steps)
    teacher.eval()
    student.train()
    train = data.split("train")
    curve_steps = {max(1, round(f * scratch / per_step)): f for f in curve_at if f <= config.distill_compute_fraction}
    curve: list[tuple[float, float]] = []
    for step in tqdm(range(steps), desc="distill"):
        if step in curve_steps:
            curve.append((step * per_step / scratch, student_val_loss(student, data, config)))
            student.train()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor(step)
        batch = sample_batch(train, config.batch_size, config.seq_len, np.random.default_rng([config.seed, step]))
        batch = batch.to(device)
        with torch.no_grad():
            target = DistillationTarget.from_logits(teacher(batch).logits, config.temperature)
        out = student(batch)
        loss = config.ce_weight * causal_lm_loss(out.logits, batch) + out.balancing_loss(student.config)
        loss = loss + config.kd_weight * distillation_loss(out.logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
    student.eval()
    after = student_val_loss(student, data, config)
    spent = steps * per_step / scratch
    return DistillResult(steps, spent, before, after, (*curve, (spent, after)))


@dataclass(frozen=True)
class ExtractResult:
    model_dir: Path
    spec: SubnetSpec
    total_params: int
    active_params: int
    total_fraction: float
    active_fraction: float
    distill: DistillResult


def run_extract(
    supernet: ElasticMoE,
    spec: SubnetSpec,
    data: PreparedData,
    config: ExtractConfig,
    pretrain_tokens: int,
    output_dir: str | Path,
) -> ExtractResult:
    """Extract `spec`, distil it if configured, save it (safetensors + config + spec JSON)."""
    student = extract_subnet(supernet, spec)
    if config.distill:
        distilled = distill_subnet(student, supernet, data, config, pretrain_tokens)
    else:
        loss = student_val_loss(student, data, config)
        distilled = DistillResult(0, 0.0, loss, loss)
    model_dir = save_model(student, Path(output_dir) / "subnet")
    (model_dir / "subnet_spec.json").write_text(spec.model_dump_json())
    full, cost = subnet_cost(supernet.config), subnet_cost(supernet.config, spec)
    return ExtractResult(
        model_dir,
        spec,
        cost.total_params,
        cost.active_params,
        cost.total_params / full.total_params,
        cost.active_params / full.active_params,
        distilled,
    )


def describe_result(result: ExtractResult) -> dict[str, str]:
    """Registry tags of an extracted sub-model."""
    return {
        "subnet_spec": result.spec.model_dump_json(),
        "subnet": result.spec.describe(),
        "total_params": str(result.total_params),
        "active_params": str(result.active_params),
        "total_params_fraction": f"{result.total_fraction:.4f}",
        "active_params_fraction": f"{result.active_fraction:.4f}",
        "val_loss_before_distill": f"{result.distill.val_loss_before:.4f}",
        "val_loss_after_distill": f"{result.distill.val_loss_after:.4f}",
        "distill_steps": str(result.distill.steps),
        "distill_compute_fraction": f"{result.distill.compute_fraction:.4f}",
        "distill_val_perplexity": f"{math.exp(min(result.distill.val_loss_after, 50)):.2f}",
    }


@task(name="extract", retries=1, retry_delay_seconds=5)
def extract_task(
    config: ExtractConfig,
    ranked_supernet_dir: str,
    spec_json: str,
    data_dir: str,
    workdir: str,
    supernet_version: str,
    pretrain_tokens: int,
    limits: dict[str, float],
) -> ExtractedSubnet:
    """Extract and distil the chosen sub-model, then register it as a `trainonce-subnet` version."""
    data = PreparedData.load(data_dir)
    supernet = load_model(ranked_supernet_dir).eval()
    spec = SubnetSpec.model_validate_json(spec_json)
    logger = RunLogger(workdir, run_name="extract", tags={"stage": "extract"})
    logger.log_params({"extract": config.model_dump(mode="json"), "subnet_spec": spec_json})
    output = Path(workdir) / "extract" / Path(ranked_supernet_dir).parent.name / spec.describe().replace(" ", "_")
    result = run_extract(supernet, spec, data, config, pretrain_tokens, output)
    logger.log_metrics(
        {
            "val_loss_before_distill": result.distill.val_loss_before,
            "val_loss_after_distill": result.distill.val_loss_after,
            "distill_steps": result.distill.steps,
            "distill_compute_fraction": result.distill.compute_fraction,
            "total_params_fraction": result.total_fraction,
            "active_params_fraction": result.active_fraction,
        },
        step=0,
    )
    tags = {
        "stage": "extract",
        "parent_model": f"{SUPERNET_MODEL}/{supernet_version}",
        "parent_supernet_version": supernet_version,
        "data_fingerprint": data.fingerprint,
        "budgets": json.dumps(limits),
        "git_commit": git_commit(),
        **describe_result(result),
    }
    version = register_checkpoint(
        workdir,
        logger.run_id,
        SUBNET_MODEL,
        result.model_dir,
        data.tokenizer_path,
        {"subnet_spec": spec.model_dump(mode="json"), "chat_format": data.chat_format.model_dump(mode="json")},
        tags,
    )
    logger.finish()
    return ExtractedSubnet(
        model_uri=version.uri,
        version=version.version,
        model_dir=str(result.model_dir),
        subnet=spec.describe(),
        parent_model=tags["parent_model"],
        budget=SubnetBudget(
            **limits, distill_compute_fraction=config.distill_compute_fraction if config.distill else None
        ),
        achieved=SubnetAchieved(
            total_params=result.total_params,
            active_params=result.active_params,
            total_params_fraction=result.total_fraction,
            active_params_fraction=result.active_fraction,
            val_loss_before_distill=result.distill.val_loss_before,
            val_loss_after_distill=result.distill.val_loss_after,
            distill_steps=result.distill.steps,
            distill_compute_fraction=result.distill.compute_fraction,
        ),
    )
