"""The optimiser and learning-rate schedule every training loop shares (pre-training, distillation, SFT, DPO)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field


class OptimConfig(BaseModel):
    """AdamW with linear warm-up and cosine decay, and gradient clipping."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(3e-3, gt=0, le=1, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(5, ge=0, le=1_000_000, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, le=1, description="AdamW decoupled weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm.")


def fine_tuning_optim(lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> OptimConfig:
    """A fine-tuning stage's default optimiser (distillation, SFT, DPO, GRPO): AdamW without weight decay and with
    torch's default betas (0.9, 0.999), as those stages have always trained; pre-training's default is the class's."""
    return OptimConfig(lr=lr, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, weight_decay=0.0, beta2=0.999)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of a linear warm-up: (step + 1) / warmup_steps, then 1 (DPO's whole schedule)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def cosine_with_warmup(optim: OptimConfig, max_steps: int):
    """Learning-rate multiplier per step: linear warm-up, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return warmup_factor(step, optim.warmup_steps)
        progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def short_run_schedule(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """The pre-training schedule shape (warm-up, cosine to min_lr_ratio) for a short run; the warm-up is capped
    so that it ends before the run does."""
    warmup = min(warmup_steps, max(0, total_steps - 1))
    return cosine_with_warmup(OptimConfig(warmup_steps=warmup, min_lr_ratio=min_lr_ratio), total_steps)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
    )
