"""The elastic recipe's schedule: which members train at which step, with which loss weights and learning rate."""

import random
import re
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from models.config import MoEConfig
from models.losses import causal_lm_loss
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, Importance
from tasks.common.optim import OptimConfig
from tasks.pretrain.config import PretrainConfig, SamplingConfig
from tasks.pretrain.sampling import SEED_STRIDE, StepPlan, elastic_lr_schedule, plan_step, restrict_space
from tasks.pretrain.step import elastic_forward_backward, project_conflict

SPACE = ElasticSpace(depths=(2, 3, 4), expert_counts=(2, 4, 6), top_ks=(1, 2), expert_sampling="nested")


def _plans(sampling: SamplingConfig, config: MoEConfig, total: int = 100):
    importance = Importance.identity(config)
    return [plan_step(sampling, SPACE, config, importance, 0, step, total) for step in range(total)]


def test_delayed_start_trains_the_full_model_alone_then_ramps_the_subnets_in(tiny_config: MoEConfig) -> None:
    plans = _plans(SamplingConfig(policy="sandwich", elastic_start=0.5, ramp=0.2), tiny_config)
    assert all(p.members == [None] and p.subnet_scale == 0 for p in plans[:50])
    assert all(len(p.members) == 3 and p.members[0] is None for p in plans[50:])
    # linear ramp over 20 steps from step 50: 1/20 at the first elastic step, 1 from step 69 on
    assert [p.subnet_scale for p in plans[50:53]] == pytest.approx([0.05, 0.10, 0.15])
    assert plans[68].subnet_scale == pytest.approx(0.95) and all(p.subnet_scale == 1 for p in plans[69:])
    smallest = SPACE.smallest(tiny_config, Importance.identity(tiny_config))
    assert all(p.members[1] == smallest for p in plans[50:])


def test_elastic_end_gives_the_last_steps_to_the_full_model_alone(tiny_config: MoEConfig) -> None:
    sampling = SamplingConfig(policy="sandwich", elastic_start=0.5, ramp=0.1, elastic_end=0.9)
    plans = _plans(sampling, tiny_config)
    assert all(p.members == [None] for p in plans[:50] + plans[90:])
    assert all(len(p.members) == 3 and p.subnet_scale == 1 for p in plans[60:90])
    # progressive stages share the elastic phase (steps 50..89), not the run's remaining steps
    progressive = sampling.model_copy(update={"dimension_order": "progressive", "ramp": 0.0})
    opened = [len(progressive.open_dimensions(SPACE, s, 100)) for s in (50, 63, 64, 76, 77, 89)]
    assert opened == [1, 1, 2, 2, 3, 3]


def test_progressive_shrinking_opens_top_k_then_experts_then_depth(tiny_config: MoEConfig) -> None:
    sampling = SamplingConfig(policy="sandwich", n_random=2, elastic_start=0.4, dimension_order="progressive")
    assert [sampling.open_dimensions(SPACE, s, 100) for s in (39, 40, 59, 60, 79, 80, 99)] == [
        (),
        ("top_k",),
        ("top_k",),
        ("top_k", "experts"),
        ("top_k", "experts"),
        ("top_k", "experts", "depth"),
        ("top_k", "experts", "depth"),
    ]
    plans = _plans(sampling, tiny_config)
    for step in range(40, 60):  # only top-k shrinks: every member has all 4 layers and 6 experts
        for spec in plans[step].members[1:]:
            assert len(spec.layers) == 4 and spec.moe_expert_counts == (6, 6, 6)
    assert {len(spec.layers) for p in plans[60:80] for spec in p.members[1:]} == {4}
    assert {spec.moe_expert_counts[0] for p in plans[60:80] for spec in p.members[1:]} == {2, 4, 6}
    assert {len(spec.layers) for p in plans[80:] for spec in p.members[1:]} == {2, 3, 4}
    # the smallest member of each stage is the smallest of the dimensions opened so far
    assert [plans[s].members[1].describe() for s in (40, 60, 80)] == ["L4 E6 k1", "L4 E2 k1", "L2 E2 k1"]


def test_dimensions_with_one_value_are_not_given_a_stage() -> None:
    space = ElasticSpace(depths=(4,), expert_counts=(2, 6), top_ks=(1, 2))
    sampling = SamplingConfig(dimension_order="progressive")
    assert [sampling.open_dimensions(space, s, 10) for s in (0, 4, 5, 9)] == [
        ("top_k",),
        ("top_k",),
        ("top_k", "experts"),
        ("top_k", "experts"),
    ]
    assert restrict_space(space, ("top_k",)).expert_counts == (6,)


def test_size_skew_favours_larger_members(tiny_config: MoEConfig) -> None:
    def depths(skew: float) -> Counter:
        plans = _plans(SamplingConfig(policy="random", size_skew=skew), tiny_config, total=600)
        return Counter(len(p.members[1].layers) for p in plans)

    uniform, skewed = depths(0.0), depths(2.0)
    assert all(150 < uniform[d] < 250 for d in (2, 3, 4))  # about 200 each
    # weights 1 : 4 : 9 -> about 43, 171, 386 of 600
    assert skewed[2] < 80 and skewed[4] > 320


def test_uniform_sampling_keeps_the_random_stream_of_earlier_runs(tiny_config: MoEConfig) -> None:
    importance = Importance.identity(tiny_config)
    plan = plan_step(SamplingConfig(policy="random"), SPACE, tiny_config, importance, 3, 7, 100)
    expected = SPACE.sample(tiny_config, importance, random.Random(3 * SEED_STRIDE + 7))
    assert plan.members == [None, expected]


def test_subnet_losses_are_weighted_by_the_ramp_and_subnet_lm_weight(tiny_config: MoEConfig) -> None:
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config)
    batch = torch.randint(0, tiny_config.vocab_size, (2, 16))
    smallest = SPACE.smallest(tiny_config, model.importance())

    def gradient(plan_scale: float, **sampling) -> torch.Tensor:
        config = PretrainConfig(model=tiny_config, elastic=SPACE, sampling=SamplingConfig(**sampling), seq_len=16)
        model.zero_grad()
        plan = StepPlan([None, smallest], plan_scale)
        elastic_forward_backward(model, config, batch, plan, lambda loss: loss.backward())
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full_only, both, half = gradient(0.0), gradient(1.0), gradient(0.5)
    torch.testing.assert_close(half, (full_only + both) / 2, rtol=1e-4, atol=1e-6)
    # distillation only (BigNAS): subnet_lm_weight 0 and distill_weight 0 leave the sub-model its balancing loss
    no_terms = gradient(1.0, subnet_lm_weight=0.0, distill_weight=0.0)
    assert not torch.allclose(no_terms, both)
    lm_only = gradient(1.0, distill_weight=0.0)
    lm_double = gradient(1.0, distill_weight=0.0, subnet_lm_weight=2.0)
    torch.testing.assert_close(lm_double - lm_only, lm_only - no_terms, rtol=1e-3, atol=1e-6)


def test_elastic_lr_restarts_the_schedule_over_the_elastic_phase() -> None:
    optim = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    sampling = SamplingConfig(policy="sandwich", elastic_start=0.9, elastic_lr=0.2)
    factor = elastic_lr_schedule(optim, sampling, 1000)
    assert factor(9) == pytest.approx(1.0) and factor(899) == pytest.approx(0.1, abs=1e-3)  # parent decays fully
    assert factor(900) == pytest.approx(0.2 * 0.1)  # fresh warm-up: step 1 of 10, peak 0.2
    assert factor(909) == pytest.approx(0.2) and factor(999) == pytest.approx(0.02, abs=1e-3)
    plain = elastic_lr_schedule(optim, sampling.model_copy(update={"elastic_lr": None}), 1000)
    assert plain(900) < 0.2 and plain(909) == pytest.approx(plain(908), abs=1e-2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"elastic_start": 0.8, "ramp": 0.3}, "elastic_start=0.8 + ramp=0.3 must be <= 1"),
        ({"policy": "full", "elastic_start": 0.5}, "policy=full trains no sub-model"),
        ({"elastic_start": 1.0}, "elastic_start"),
        ({"elastic_start": 0.5, "ramp": 0.1, "elastic_end": 0.6}, "elastic_end=0.6 must be > elastic_start + ramp"),
        ({"policy": "full", "elastic_end": 0.9}, "policy=full trains no sub-model"),
        ({"size_skew": -1}, "size_skew"),
        ({"dimension_order": "sideways"}, "dimension_order"),
    ],
)
def test_bad_recipes_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        SamplingConfig(**fields)


def test_conflicting_gradient_components_are_projected_away() -> None:
    full = torch.tensor([1.0, 0.0])
    assert torch.equal(project_conflict(torch.tensor([1.0, 1.0]), full), torch.tensor([1.0, 1.0]))  # agrees: kept
    torch.testing.assert_close(project_conflict(torch.tensor([-2.0, 1.0]), full), torch.tensor([0.0, 1.0]))
    assert project_conflict(None, full) is None


def test_gradient_surgery_adds_only_the_non_conflicting_subnet_gradient(tiny_config: MoEConfig) -> None:
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config)
    batch = torch.randint(0, tiny_config.vocab_size, (2, 16))
    smallest = SPACE.smallest(tiny_config, model.importance())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):  # fit the full model to the batch: the smallest sub-model then pulls elsewhere
        optimizer.zero_grad()
        causal_lm_loss(model(batch).logits, batch).backward()
        optimizer.step()

    def grads(plan: StepPlan, **sampling) -> list[torch.Tensor | None]:
        config = PretrainConfig(model=tiny_config, elastic=SPACE, sampling=SamplingConfig(**sampling), seq_len=16)
        model.zero_grad(set_to_none=True)
        elastic_forward_backward(model, config, batch, plan, lambda loss: loss.backward())
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    full = grads(StepPlan([None], 1.0), distill_weight=0.0)
    both = grads(StepPlan([None, smallest], 1.0), distill_weight=0.0)
    projected = grads(StepPlan([None, smallest], 1.0), distill_weight=0.0, project_conflicts=True)
    conflicts = 0
    for f, b, p in zip(full, both, projected, strict=True):
        if f is None:
            assert p is None or b is not None
            continue
        sub = b - f
        expected = f + (sub if (sub * f).sum() >= 0 else sub - (sub * f).sum() / f.pow(2).sum() * f)
        torch.testing.assert_close(p, expected, rtol=1e-4, atol=1e-7)
        conflicts += int((sub * f).sum() < 0)
    assert conflicts > 0  # the case is not vacuous: some tensors did conflict
