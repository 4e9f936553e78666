"""Replay of pre-training text during fine-tuning (SFT, GRPO): a few corpus windows per step trained on with the
language-modelling loss beside the stage's own, so fine-tuning does not erase language modelling (on the tiny model,
SFT without replay raised validation perplexity; docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.losses import causal_lm_loss
from tasks.data.sampling import TrainingMix


class ReplayConfig(BaseModel):
    """Pre-training windows replayed per fine-tuning step."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(
        0, ge=0, le=65_536, description="Pre-training windows per step trained on with the LM loss (0: no replay)."
    )
    weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the replayed windows' LM loss.")
    seq_len: int | None = Field(
        None,
        ge=8,
        le=1_048_576,
        description="Tokens per window (None: the stage's own length: SFT's max_len, else the model's context).",
    )


def replay_loss(
    model: torch.nn.Module,
    mix: TrainingMix,
    config: ReplayConfig,
    seq_len: int,
    rng: np.random.Generator,
    device: torch.device,
) -> torch.Tensor:
    """The weighted LM loss of `config.batch_size` windows of pre-training data (of `config.seq_len`, else
    `seq_len`), drawn as pre-training draws them: text and, with images, image-text documents at their share."""
    window = mix.sample(config.batch_size, config.seq_len or seq_len, rng).to(device)
    return config.weight * causal_lm_loss(model(window).logits, window)
