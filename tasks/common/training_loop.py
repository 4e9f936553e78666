"""The one optimisation loop of the stages that fine-tune a standalone model: distillation after extraction, SFT,
DPO and GRPO. It owns what they used to write four times (with four slightly different optimisers): accelerate's
device placement and backward, AdamW as the stage's `optim:` says (tasks.common.optim.build_optimizer), the
warm-up + cosine schedule down to `optim.min_lr_ratio`, gradient clipping, and the progress bar. A stage writes
only how it computes its loss:

    loop = TrainingLoop(model, config.optim, config.steps)
    for step in loop.steps("sft"):
        loop.update(loss_of(loop.model, batch))

Pre-training keeps its own loop (tasks/pretrain/loop.py): it samples sub-models, checkpoints, validates a panel
and runs in several processes, none of which these stages need.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from models.moe import ElasticMoE
from tasks.common.optim import OptimConfig, build_optimizer, short_run_schedule


class TrainingLoop:
    """`steps` optimiser steps of `model` (trained in place) under `optim`."""

    def __init__(self, model: ElasticMoE, optim: OptimConfig, steps: int) -> None:
        self.accelerator = Accelerator()
        self.optim, self.total_steps = optim, steps
        self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(model, optim))
        self.lr_factor = short_run_schedule(optim.warmup_steps, steps, optim.min_lr_ratio)

    @property
    def core(self) -> ElasticMoE:
        """The model itself (unwrapped from what accelerate prepared), for generation and saving."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def lr(self) -> float:
        """The learning rate of the current step."""
        return self.optimizer.param_groups[0]["lr"]

    def steps(self, description: str) -> Iterator[int]:
        """Each step's index, with the learning rate already set for it, under a progress bar."""
        for step in tqdm(range(self.total_steps), desc=description):
            for group in self.optimizer.param_groups:
                group["lr"] = self.optim.lr * self.lr_factor(step)
            yield step

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss`: backward, clip the global gradient norm, step, clear the gradients."""
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
