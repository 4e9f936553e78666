"""The elastic recipe: which sub-models train at each pre-training step, and with what loss weights.

Published recipes that reach independently-trained quality differ from "random sub-models from step 0 with
equal weights" in a few ways, each a field of `SamplingConfig` here (no code forks), so that the claim
benchmark can measure each as a row:

- delayed shrinking (DepS, Once-for-All): the full model trains alone for `elastic_start` of the run, then the
  sub-models join with their loss weight ramped up from 0 over `ramp` of the run;
- progressive shrinking (Once-for-All): the elastic dimensions open one at a time (top-k, then expert count,
  then depth) instead of all at once;
- weights and sampling that favour the full model (Nemotron Elastic's second stage): `subnet_lm_weight`
  below 1 and `size_skew` above 0;
- elastify a trained parent (Flextron, Nemotron Elastic): `elastic_start` near the end of the run with its own
  learning-rate schedule over the elastic phase (`elastic_lr`), or `init_from` a trained model.

A step's plan depends only on (config, importance order, seed, step), so a resumed run, the FLOP accounting
of a benchmark and a test all replay exactly the members a run trained.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.config import MoEConfig
from models.subnet import ElasticSpace, Importance, SubnetSpec
from tasks.optim import OptimConfig, cosine_with_warmup, short_run_schedule

# The order in which progressive shrinking opens the elastic dimensions: the least structural first
# (routing fewer experts changes no weight), depth last (skipping a layer changes every later layer's input).
PROGRESSIVE_ORDER = ("top_k", "experts", "depth")
# Step `step` of seed `seed` draws from random.Random(seed * SEED_STRIDE + step): a prime stride keeps the streams
# of nearby seeds apart, and it is the stream earlier runs used (same draws, same figures).
SEED_STRIDE = 1_000_003


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
        elastic = tuple(d for d in PROGRESSIVE_ORDER if len(_values(space, d)) > 1)
        if self.dimension_order == "together" or not elastic:
            return elastic
        stage = (step - start) * len(elastic) // max(1, self.elastic_end_step(total_steps) - start)
        return elastic[: stage + 1]


def _values(space: ElasticSpace, dimension: str) -> tuple[int, ...]:
    return {"top_k": space.top_ks, "experts": space.expert_counts, "depth": space.depths}[dimension]


def restrict_space(space: ElasticSpace, open_dims: tuple[str, ...]) -> ElasticSpace:
    """The sub-space in which only `open_dims` shrink: the other dimensions keep only their largest value."""
    return space.model_copy(
        update={
            "depths": space.depths if "depth" in open_dims else space.depths[-1:],
            "expert_counts": space.expert_counts if "experts" in open_dims else space.expert_counts[-1:],
            "top_ks": space.top_ks if "top_k" in open_dims else space.top_ks[-1:],
        }
    )


@dataclass(frozen=True)
class StepPlan:
    """What one optimiser step trains."""

    members: list[SubnetSpec | None]  # None (the full model) first: the teacher of in-place distillation
    subnet_scale: float  # multiplier of every sub-model loss this step (0 when only the full model trains)


def plan_step(
    sampling: SamplingConfig,
    space: ElasticSpace,
    config: MoEConfig,
    importance: Importance,
    seed: int,
    step: int,
    total_steps: int,
) -> StepPlan:
    """The members trained at `step` of a `total_steps` run, from a generator derived from (seed, step) alone."""
    scale = sampling.subnet_scale(step, total_steps)
    if scale == 0.0:
        return StepPlan([None], 0.0)
    rng = random.Random(seed * SEED_STRIDE + step)
    sub = restrict_space(space, sampling.open_dimensions(space, step, total_steps))
    if sampling.policy == "random":
        return StepPlan([None, sub.sample(config, importance, rng, sampling.size_skew)], scale)
    randoms = [sub.sample(config, importance, rng, sampling.size_skew) for _ in range(sampling.n_random)]
    return StepPlan([None, sub.smallest(config, importance), *randoms], scale)


def elastic_lr_schedule(optim: OptimConfig, sampling: SamplingConfig, total_steps: int):
    """Learning-rate multiplier per step: warm-up then cosine over the whole run, or, with `elastic_lr`, over the
    full-model phase and again (peak `elastic_lr`) over the elastic phase, as when elastifying a trained parent."""
    start = sampling.elastic_start_step(total_steps)
    if sampling.elastic_lr is None or start in (0, total_steps):
        return cosine_with_warmup(optim, total_steps)
    first = cosine_with_warmup(optim, start)
    second = short_run_schedule(optim.warmup_steps, total_steps - start, optim.min_lr_ratio)
    peak = sampling.elastic_lr

    def factor(step: int) -> float:
        return first(step) if step < start else peak * second(step - start)

    return factor
