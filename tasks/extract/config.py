"""The extraction stage's settings (`extract:` in a preset): how the chosen sub-model is distilled from the supernet
after it is cut out (tasks/extract/distill.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.common.optim import fine_tuning_optim
from tasks.common.settings import OPTIM_MOVES, refuse_moved_keys, with_defaults

DISTILL_OPTIM = fine_tuning_optim(3e-4, 5)  # what an `optim:` key left unset means


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
    optim: with_defaults(DISTILL_OPTIM) = Field(
        default_factory=DISTILL_OPTIM.model_copy,
        description="Optimiser and schedule of distillation (AdamW, warm-up, cosine). Its peak rate is about 1/10 of "
        "pre-training's: in the claim benchmark 1e-3 first undid what the cut had learned, 3e-4 improved it from "
        "the first step (docs/claim.md).",
    )
    batch_size: int = Field(16, ge=1, le=65_536, description="Sequences per distillation batch.")
    seq_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per distillation sequence.")
    eval_batches: int = Field(4, ge=1, le=10_000, description="Validation batches before/after distillation.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of distillation batches.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        return refuse_moved_keys("extract", data, OPTIM_MOVES)
