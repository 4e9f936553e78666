"""Sub-model search: budgets, infeasibility errors, Pareto front, and evolutionary vs exhaustive optimality."""

import math

import pytest
import torch
from pydantic import ValidationError

from models.accounting import subnet_cost
from models.config import MoEConfig
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, Importance, SubnetSpec
from tasks.search.config import SearchConfig
from tasks.search.search import Candidate, SearchSpace, measure_latency_ms, pareto_front, run_search

CONFIG = MoEConfig(
    vocab_size=300, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2, expert_ffn_dim=32
)
SPACE = ElasticSpace(depths=(3, 4, 5, 6), expert_counts=(2, 4, 6, 8), top_ks=(1, 2))
IMPORTANCE = Importance.identity(CONFIG)
LAYER_VALUE = (0.9, 0.2, 0.5, 0.1, 0.4, 0.8)  # what dropping each layer costs


def searching(**fields) -> SearchConfig:
    """A search with only the budgets a test names (the defaults add the tiny preset's ERNIE 5.1 cut)."""
    return SearchConfig(
        **{"total_params_fraction": None, "active_params_fraction": None, "max_evaluations": 32, **fields}
    )


def synthetic_loss(spec: SubnetSpec) -> float:
    """A structured landscape: more active compute helps, and some layers matter far more than others."""
    dropped = sum(LAYER_VALUE[i] for i in range(CONFIG.n_layers) if i not in spec.layers)
    return 3.0 - 0.3 * math.log(subnet_cost(CONFIG, spec).active_params) + dropped + 0.05 * spec.top_k


@pytest.mark.parametrize("fraction", [0.6, 0.75])
def test_evolutionary_search_finds_the_exhaustive_optimum_with_a_quarter_of_the_evaluations(fraction: float) -> None:
    """A stochastic search, so judged over ten seeds: nearly always the optimum, never far from it."""
    budget = {"active_params_fraction": fraction}
    exhaustive = run_search(searching(method="exhaustive", **budget), CONFIG, SPACE, IMPORTANCE, synthetic_loss)
    quarter = len(exhaustive.evaluated) // 4
    assert quarter >= 50, "the space must be large enough for the comparison to mean something"
    limit = exhaustive.limits["active_params"]
    gaps = []
    for seed in range(10):
        search = searching(method="evolutionary", max_evaluations=quarter, seed=seed, **budget)
        evolutionary = run_search(search, CONFIG, SPACE, IMPORTANCE, synthetic_loss)
        assert evolutionary.method == "evolutionary" and len(evolutionary.evaluated) <= quarter
        assert all(c.active_params <= limit for c in evolutionary.evaluated)
        gaps.append(evolutionary.chosen.val_loss - exhaustive.chosen.val_loss)
    assert sum(gap <= 0.02 for gap in gaps) >= 8, gaps
    assert max(gaps) <= 0.15 and sum(gaps) / len(gaps) <= 0.03, gaps


def test_exhaustive_respects_every_budget_and_returns_the_best() -> None:
    result = run_search(
        searching(total_params_fraction=0.5, active_params=100_000), CONFIG, SPACE, IMPORTANCE, synthetic_loss
    )
    full = subnet_cost(CONFIG)
    assert result.method == "exhaustive" or len(result.evaluated) <= 32
    assert all(c.total_params <= 0.5 * full.total_params and c.active_params <= 100_000 for c in result.evaluated)
    assert result.chosen.val_loss == min(c.val_loss for c in result.evaluated)
    assert result.space_size == len(SearchSpace(SPACE, CONFIG, IMPORTANCE).genomes())


def test_infeasible_budget_names_the_smallest_achievable_value() -> None:
    smallest = min(
        subnet_cost(CONFIG, g.spec(CONFIG, IMPORTANCE)).active_params
        for g in SearchSpace(SPACE, CONFIG, IMPORTANCE).genomes()
    )
    with pytest.raises(
        ValueError, match=f"active_params budget 1,000 is infeasible: the smallest sub-model has {smallest:,}"
    ):
        run_search(searching(active_params=1000), CONFIG, SPACE, IMPORTANCE, synthetic_loss)
    with pytest.raises(ValueError, match="total_params budget .* is infeasible"):
        run_search(searching(total_params_fraction=0.01), CONFIG, SPACE, IMPORTANCE, synthetic_loss)


def test_budget_given_twice_is_rejected() -> None:
    with pytest.raises(ValidationError, match="set active_params or active_params_fraction, not both"):
        searching(active_params=10, active_params_fraction=0.5)


def test_pareto_front_keeps_only_non_dominated() -> None:
    spec = SubnetSpec.full(CONFIG)

    def c(active: int, loss: float) -> Candidate:
        return Candidate(spec, active, active, None, loss)

    front = pareto_front([c(10, 3.0), c(20, 3.5), c(30, 2.0), c(15, 2.5), c(40, 2.0)])
    assert [(x.active_params, x.val_loss) for x in front] == [(10, 3.0), (15, 2.5), (30, 2.0)]


def test_latency_budget_uses_real_measurements(tiny_supernet: ElasticMoE) -> None:
    config = tiny_supernet.config
    space = ElasticSpace(depths=(2, 4), expert_counts=(2, 6), top_ks=(1,))
    # a budget every real measurement meets, on a busy machine too (a fraction of the full model's own measurement
    # failed when a sub-model was timed while another process took the core)
    search = searching(latency_ms=10_000.0, latency_new_tokens=4, latency_repeats=1, latency_prompt_tokens=4)

    def probe(spec: SubnetSpec | None) -> float:
        return measure_latency_ms(tiny_supernet, spec, search)

    assert probe(None) > 0
    result = run_search(search, config, space, tiny_supernet.importance(), synthetic_loss_for(config), probe)
    assert all(c.latency_ms is not None and c.latency_ms > 0 for c in result.evaluated)
    with pytest.raises(ValueError, match="latency budget 0.000 ms/token is infeasible: the cheapest sub-model"):
        run_search(
            search.model_copy(update={"latency_ms": 1e-6}),
            config,
            space,
            tiny_supernet.importance(),
            synthetic_loss_for(config),
            probe,
        )


def synthetic_loss_for(config: MoEConfig):
    return lambda spec: 10.0 - 0.1 * math.log(subnet_cost(config, spec).active_params)


def test_choice_margin_is_paired_and_says_when_it_is_within_the_noise() -> None:
    """The search picks the lowest mean; the margin to the runner-up is judged on the per-batch differences."""
    from tasks.search.search import _key, choice_margin

    result = run_search(searching(active_params_fraction=0.6), CONFIG, SPACE, IMPORTANCE, synthetic_loss)
    ranked = sorted(result.evaluated, key=lambda c: c.val_loss)
    chosen, runner = ranked[0], ranked[1]
    # batches that are hard for every member alike: a large spread of each loss, a steady difference
    hardness = [0.0, 0.9, -0.4, 0.3]
    steady = {_key(c.spec): [c.val_loss + h for h in hardness] for c in result.evaluated}
    margin = choice_margin(result, steady)
    assert margin is not None and margin.runner_up == runner.spec.describe()
    assert margin.margin == pytest.approx(runner.val_loss - chosen.val_loss)
    assert margin.stderr == pytest.approx(0.0, abs=1e-9) and not margin.within_noise
    # differences that swing by five times the margin: the same mean, but the choice is a coin toss
    swing = 5 * max(margin.margin, 0.01)
    jitter = (swing, -swing, swing, -swing)
    noisy = {**steady, _key(runner.spec): [loss + j for loss, j in zip(steady[_key(runner.spec)], jitter, strict=True)]}
    judged = choice_margin(result, noisy)
    assert judged.margin == pytest.approx(margin.margin) and judged.stderr > margin.margin / 2
    assert judged.within_noise and "within the noise" in judged.describe()


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_the_objective_weighs_text_and_image_validation_batch_by_batch(weight: float, image_data) -> None:
    """With images the search can choose on both modalities: each batch's loss is (1 - w) x the text's + w x the
    image-text documents', so candidates still compare pairwise batch by batch."""
    from tasks.pretrain.validation_panel import panel_batch_losses
    from tasks.search.search import ValidationObjective, _key
    from tests.conftest import image_model

    model = image_model()
    config = searching(image_loss_weight=weight, eval_batches=3, eval_batch_size=4, seq_len=32)
    objective = ValidationObjective(model, image_data, config)
    spec = SubnetSpec.full(model.config)
    value = objective(spec)
    device = torch.device("cpu")
    text = panel_batch_losses(model, {"s": spec}, image_data.split("val"), 4, 32, 3, device)["s"]
    image = panel_batch_losses(model, {"s": spec}, image_data.image_split("val"), 4, 32, 3, device)["s"]
    expected = [(1 - weight) * t + weight * i for t, i in zip(text, image, strict=True)]
    assert objective.batch_losses[_key(spec)] == pytest.approx(expected)
    assert value == pytest.approx(sum(expected) / 3)
