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

import random
from dataclasses import dataclass

from models.config import MoEConfig
from models.subnet import ElasticSpace, Importance, SubnetSpec
from tasks.common.optim import OptimConfig, cosine_with_warmup, short_run_schedule
from tasks.pretrain.config import SamplingConfig

# Step `step` of seed `seed` draws from random.Random(seed * SEED_STRIDE + step): a prime stride keeps the streams
# of nearby seeds apart, and it is the stream earlier runs used (same draws, same figures).
SEED_STRIDE = 1_000_003


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
