"""Distillation of an extracted sub-model from the supernet's logits (KL plus CE), for a compute budget expressed as
a fraction of what pre-training that architecture from scratch on the supernet's tokens would cost (ERNIE 5.1:
about 6%); `student_val_loss` is the validation figure every row of the extraction and the claim compares on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.losses import DistillationTarget, causal_lm_loss, distillation_loss
from models.moe import ElasticMoE
from tasks.common.throughput import training_flops
from tasks.common.training_loop import TrainingLoop
from tasks.data.corpus import PreparedData
from tasks.extract.config import ExtractConfig
from tasks.pretrain.validation_panel import evaluate_panel


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
    loop = TrainingLoop(student, config.optim, steps)
    teacher.eval()
    student.train()
    mix = data.training_mix()
    curve_steps = {max(1, round(f * scratch / per_step)): f for f in curve_at if f <= config.distill_compute_fraction}
    curve: list[tuple[float, float]] = []
    for step in loop.steps("distill"):
        if step in curve_steps:
            curve.append((step * per_step / scratch, student_val_loss(student, data, config)))
            student.train()
        batch = mix.sample(config.batch_size, config.seq_len, np.random.default_rng([config.seed, step]))
        batch = batch.to(device)
        with torch.no_grad():
            target = DistillationTarget.from_logits(teacher(batch).logits, config.temperature)
        out = loop.model(batch)
        loss = config.ce_weight * causal_lm_loss(out.logits, batch) + out.balancing_loss(student.config)
        loop.update(loss + config.kd_weight * distillation_loss(out.logits, target))
    student.eval()
    after = student_val_loss(student, data, config)
    spent = steps * per_step / scratch
    return DistillResult(steps, spent, before, after, (*curve, (spent, after)))
