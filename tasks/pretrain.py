"""Pre-training stage: one run trains the whole sub-model family of the elastic supernet.

Each optimiser step trains the sub-models the sampling policy picks (ERNIE 5.0's `random`, BigNAS's
`sandwich` with in-place distillation, or the `full` baseline) on the same batch, with load balancing for
every sampled sub-model. The loop runs under HF accelerate (devices, mixed precision, gradient accumulation,
`accelerate launch -m tasks.pretrain` for several processes).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from models.checkpoint import save_model
from models.config import MoEConfig
from models.losses import causal_lm_loss, distillation_loss
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, SubnetSpec
from tasks.data import PreparedData, sample_batch


class SamplingConfig(BaseModel):
    """Which sub-models train at each step."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["full", "random", "sandwich"] = Field(
        "sandwich",
        description="`full`: only the full model (baseline); `random`: full + one random sub-model (ERNIE 5.0); "
        "`sandwich`: largest + smallest + n_random random sub-models (BigNAS / Universally Slimmable Networks).",
    )
    n_random: int = Field(1, ge=0, le=16, description="Random sub-models per step under `sandwich`.")
    distill_weight: float = Field(
        1.0, ge=0, le=100, description="Weight of in-place distillation from the full model (Once-for-All: 1.0)."
    )
    distill_temperature: float = Field(1.0, gt=0, le=20, description="Softmax temperature of distillation.")


class OptimConfig(BaseModel):
    """AdamW with linear warm-up and cosine decay, and gradient clipping."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(3e-3, gt=0, le=1, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, le=1, description="AdamW decoupled weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm.")


class PretrainConfig(BaseModel):
    """Everything the pre-training stage needs besides the prepared data."""

    model_config = ConfigDict(extra="forbid")

    model: MoEConfig = Field(default_factory=MoEConfig, description="Supernet shape and routing.")
    elastic: ElasticSpace = Field(default_factory=ElasticSpace, description="The sub-model family trained.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sub-models per step.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Sequences per micro-batch per process.")
    seq_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimiser step.")
    max_steps: int = Field(50, ge=1, le=10_000_000, description="Optimiser steps.")
    precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate mixed precision: `no` (fp32, CPU), `bf16` (GPU)."
    )
    eval_batches: int = Field(4, ge=1, le=10_000, description="Validation batches per evaluated sub-model.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of weights, batches and sub-model sampling.")

    @model_validator(mode="after")
    def _check_consistency(self) -> PretrainConfig:
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        try:
            self.elastic.check_fits(self.model)
        except ValueError as error:
            raise ValueError(f"elastic: {error}") from error
        if self.optim.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be < max_steps={self.max_steps}")
        return self


@dataclass(frozen=True)
class PretrainResult:
    checkpoint_dir: Path
    steps: int
    train_loss: float  # full-model LM loss of the last step
    val_loss: dict[str, float]  # per evaluated sub-model label
    tokens_per_second: float


def subnets_for_step(config: PretrainConfig, model: ElasticMoE, rng: random.Random) -> list[SubnetSpec | None]:
    """The sub-models trained this step; None (the full model) always comes first as the teacher."""
    space, cfg, importance = config.elastic, model.config, model.importance()
    policy = config.sampling.policy
    if policy == "full":
        return [None]
    if policy == "random":
        return [None, space.sample(cfg, importance, rng)]
    randoms = [space.sample(cfg, importance, rng) for _ in range(config.sampling.n_random)]
    return [None, space.smallest(cfg, importance), *randoms]


def cosine_with_warmup(optim: OptimConfig, max_steps: int):
    """Learning-rate multiplier per step: linear warm-up, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: ElasticMoE, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
    )


@torch.no_grad()
def evaluate_panel(
    model: ElasticMoE,
    panel: dict[str, SubnetSpec | None],
    val_tokens: np.ndarray,
    config: PretrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Mean validation LM loss of each sub-model in `panel`, all on the same fixed batches."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(12345)
    batches = [sample_batch(val_tokens, config.batch_size, config.seq_len, rng) for _ in range(config.eval_batches)]
    losses = {}
    for label, spec in panel.items():
        total = sum(causal_lm_loss(model(b.to(device), subnet=spec).logits, b.to(device)).item() for b in batches)
        losses[label] = total / len(batches)
    model.train(was_training)
    return losses


def run_pretrain(config: PretrainConfig, data: PreparedData, output_dir: str | Path) -> PretrainResult:
    """Train the supernet and save it (safetensors + config) under `output_dir/supernet`."""
    if data.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} must equal the tokenizer's vocabulary ({data.vocab_size})"
        )
    accelerator = Accelerator(mixed_precision=config.precision, gradient_accumulation_steps=config.grad_accum)
    set_seed(config.seed)
    model = ElasticMoE(config.model)
    optimizer = build_optimizer(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.optim, config.max_steps))
    # The scheduler stays unprepared: accelerate would step it once per process, we step it once per update.
    model, optimizer = accelerator.prepare(model, optimizer)
    core: ElasticMoE = accelerator.unwrap_model(model)

    train_tokens = data.split("train")
    batch_rng = np.random.default_rng(config.seed + accelerator.process_index)
    subnet_rng = random.Random(config.seed)  # same on every process so all ranks train the same sub-models
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * accelerator.num_processes
    progress = tqdm(range(config.max_steps), desc="pretrain", disable=not accelerator.is_main_process)
    started, train_loss = time.perf_counter(), float("nan")
    model.train()
    for step in progress:
        specs = subnets_for_step(config, core, subnet_rng)
        routing = []
        for _micro in range(config.grad_accum):
            with accelerator.accumulate(model):
                batch = sample_batch(train_tokens, config.batch_size, config.seq_len, batch_rng).to(accelerator.device)
                teacher_logits = None
                for spec in specs:
                    out = model(batch, subnet=spec)
                    lm = causal_lm_loss(out.logits, batch)
                    loss = lm + out.balancing_loss(core.config)
                    if spec is None:
                        teacher_logits, train_loss = out.logits.detach(), lm.item()
                    elif config.sampling.policy == "sandwich" and config.sampling.distill_weight > 0:
                        loss = loss + config.sampling.distill_weight * distillation_loss(
                            out.logits, teacher_logits, config.sampling.distill_temperature
                        )
                    routing.extend(out.routing)
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if core.config.load_balancing == "bias":
            core.update_routing_bias(routing)
        elapsed = time.perf_counter() - started
        progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step * (step + 1) / elapsed:.0f}")

    importance = core.importance()
    smallest = config.elastic.smallest(core.config, importance)
    largest = config.elastic.largest(core.config, importance)
    panel = {"full": None, f"largest {largest.describe()}": largest, f"smallest {smallest.describe()}": smallest}
    val_loss = evaluate_panel(core, panel, data.split("val"), config, accelerator.device)
    checkpoint_dir = Path(output_dir) / "supernet"
    if accelerator.is_main_process:
        save_model(core, checkpoint_dir)
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - started
    throughput = tokens_per_step * config.max_steps / elapsed
    return PretrainResult(checkpoint_dir, config.max_steps, train_loss, val_loss, throughput)


def main() -> None:
    """Entry point for `accelerate launch -m tasks.pretrain --config tiny`."""
    # Imported here: tasks.pipeline_config imports this module for PretrainConfig.
    from tasks.data import prepare_data
    from tasks.pipeline_config import load_pipeline_config, parse_overrides

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--output-dir", default="runs/pretrain")
    args = parser.parse_args()
    config = load_pipeline_config(args.config, parse_overrides(args.set))
    result = run_pretrain(config.pretrain, prepare_data(config.data), args.output_dir)
    print(result)


if __name__ == "__main__":
    main()
