"""Search stage: pick the best sub-model of the trained supernet under budgets.

Budgets are upper bounds on total parameters, active parameters per token and measured decode latency (ms
per generated token on this device, KV cache, batch 1), each absolute or as a fraction of the full model.
The objective is validation loss. Small spaces are evaluated exhaustively; large ones by an evolutionary
search (mutation + crossover over sub-model genomes, as Once-for-All) with a fixed evaluation budget.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.accounting import ModelCost, subnet_cost
from models.config import MoEConfig
from models.generate import greedy_generate
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, Importance, SubnetSpec, most_important
from tasks.data.corpus import PreparedData
from tasks.pretrain.validation_panel import panel_batch_losses
from tasks.search.config import SearchConfig

# Children in a row that were already evaluated or out of budget before the evolutionary search gives up: a budget
# larger than the members it can reach ends the search instead of looping.
MAX_STALE_CHILDREN = 1000


@dataclass(frozen=True)
class Genome:
    """One point of the search space: which layers run, experts kept per MoE layer, top-k."""

    layers: tuple[int, ...]
    n_experts: int
    top_k: int

    def spec(self, config: MoEConfig, importance: Importance) -> SubnetSpec:
        """The sub-model keeping the `n_experts` most important experts of each kept layer's expert pool."""
        experts = [
            most_important(importance.expert_order[i], config.expert_pools(i), self.n_experts) for i in self.layers
        ]
        return SubnetSpec(layers=self.layers, experts=tuple(experts), top_k=self.top_k)


@dataclass(frozen=True)
class Candidate:
    spec: SubnetSpec
    total_params: int
    active_params: int
    latency_ms: float | None
    val_loss: float


@dataclass(frozen=True)
class SearchResult:
    evaluated: list[Candidate]  # every sub-model whose objective was computed, in evaluation order
    pareto: list[Candidate]  # non-dominated in (active params, validation loss), smallest first
    chosen: Candidate
    method: str
    space_size: int
    limits: dict[str, float]  # the absolute budgets applied


class SearchSpace:
    """All genomes an elastic space allows: any layer subset of an allowed depth (respecting the layer
    sampling rule), any allowed expert count, any allowed top-k that fits."""

    def __init__(self, space: ElasticSpace, config: MoEConfig, importance: Importance) -> None:
        self.space, self.config, self.importance = space, config, importance

    def layer_sets(self, depth: int) -> list[tuple[int, ...]]:
        n = self.config.n_layers
        if self.space.layer_sampling == "nested":
            return [tuple(sorted(self.importance.layer_order[:depth]))]
        subsets = itertools.combinations(range(n), depth)
        if self.space.layer_sampling == "keep_ends" and n >= 2:
            return [s for s in subsets if s[0] == 0 and s[-1] == n - 1]
        return list(subsets)

    def genomes(self) -> list[Genome]:
        return [
            Genome(layers, n, k)
            for depth in self.space.depths
            for layers in self.layer_sets(depth)
            for n in self.space.expert_counts
            for k in self.space.top_ks
            if k <= n
        ]

    def all_layer_sets(self) -> list[tuple[int, ...]]:
        return [layers for depth in self.space.depths for layers in self.layer_sets(depth)]

    def mutate(self, genome: Genome, rng: random.Random, rate: float) -> Genome:
        """Small steps: swap, add or drop one layer; move to a neighbouring expert count or top-k.

        Each gene changes with probability `rate`, and at least one always does.
        """
        genes = [gene for gene in ("layers", "experts", "top_k") if rng.random() < rate]
        genes = genes or [rng.choice(("layers", "experts", "top_k"))]
        layers, n, k = genome.layers, genome.n_experts, genome.top_k
        if "layers" in genes:
            near = [s for s in self.all_layer_sets() if 0 < len(set(s) ^ set(layers)) <= 2]
            layers = rng.choice(near) if near else layers
        counts = self.space.expert_counts
        if "experts" in genes:
            i = counts.index(n) + rng.choice((-1, 1))
            n = counts[min(max(i, 0), len(counts) - 1)]
        fitting = [x for x in self.space.top_ks if x <= n]
        if "top_k" in genes or k > n:
            k = rng.choice(fitting)
        return Genome(layers, n, k)

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        """Each gene from either parent."""
        n = rng.choice((a.n_experts, b.n_experts))
        k = rng.choice([x for x in (a.top_k, b.top_k) if x <= n] or [min(self.space.top_ks)])
        return Genome(rng.choice((a.layers, b.layers)), n, k)


def measure_latency_ms(model: ElasticMoE, spec: SubnetSpec, config: SearchConfig) -> float:
    """Median ms per generated token of greedy decoding with the KV cache, batch 1, on the model's device."""
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, config.latency_prompt_tokens), device=device)
    greedy_generate(model, prompt, 2, subnet=spec)  # warm-up
    times = []
    for _ in range(config.latency_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        greedy_generate(model, prompt, config.latency_new_tokens, subnet=spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / config.latency_new_tokens)
    return statistics.median(times)


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both active parameters and validation loss, smallest first."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.active_params, c.val_loss)):
        if not front or c.val_loss < front[-1].val_loss:
            front.append(c)
    return front


LatencyProbe = Callable[[SubnetSpec | None], float]  # ms per generated token of a sub-model (None: full)


def run_search(
    config: SearchConfig,
    model_config: MoEConfig,
    space: ElasticSpace,
    importance: Importance,
    objective: Callable[[SubnetSpec], float],
    latency: LatencyProbe | None = None,
) -> SearchResult:
    """Find the sub-model with the lowest objective within the budgets.

    Raises ValueError naming the budget and the smallest achievable value when no sub-model fits, before
    any objective evaluation. Latency is measured only for sub-models that pass the parameter budgets.
    """
    search_space, genomes, specs, costs = _family_costs(model_config, space, importance)
    full = subnet_cost(model_config)
    if config.needs_latency and latency is None:
        raise ValueError("latency budget set but no latency probe given")
    latency_cache: dict[Genome, float] = {}

    def latency_of(g: Genome) -> float:
        if g not in latency_cache:
            latency_cache[g] = latency(specs[g])  # type: ignore[misc]
        return latency_cache[g]

    limits = _absolute_limits(config, full.total_params, full.active_params, latency)
    _check_parameter_budgets_reachable(limits, genomes, costs)
    _check_latency_budget_reachable(limits, genomes, costs, latency_of)

    def fits_params(g: Genome) -> bool:
        cost = costs[g]
        return cost.total_params <= limits.get("total_params", float("inf")) and cost.active_params <= limits.get(
            "active_params", float("inf")
        )

    def fits_latency(g: Genome) -> bool:
        return "latency_ms" not in limits or latency_of(g) <= limits["latency_ms"]

    pool = [g for g in genomes if fits_params(g)]
    if not pool:
        raise ValueError(f"no sub-model satisfies the parameter budgets together ({_describe(limits)})")
    method = config.method
    if method == "auto":
        method = "exhaustive" if len(pool) <= config.max_evaluations else "evolutionary"

    evaluated: dict[Genome, Candidate] = {}

    def evaluate(g: Genome) -> None:
        cost = costs[g]
        evaluated[g] = Candidate(
            specs[g], cost.total_params, cost.active_params, latency_cache.get(g), objective(specs[g])
        )

    if method == "exhaustive":
        for g in pool:
            if fits_latency(g):
                evaluate(g)
    else:
        _evolve(config, search_space, pool, fits_latency, evaluate, evaluated)
    if not evaluated:
        raise ValueError(f"no sub-model satisfies all budgets together ({_describe(limits)})")
    candidates = list(evaluated.values())
    chosen = min(candidates, key=lambda c: (c.val_loss, c.active_params))
    return SearchResult(candidates, pareto_front(candidates), chosen, method, len(genomes), limits)


def _evolve(
    config: SearchConfig,
    search_space: SearchSpace,
    pool: list[Genome],
    fits_latency: Callable[[Genome], bool],
    evaluate: Callable[[Genome], None],
    evaluated: dict[Genome, Candidate],
) -> None:
    """Evolution with a fixed evaluation budget: a random population, then children of the best."""
    rng = random.Random(config.seed)
    allowed, rejected = set(pool), set()
    budget = min(config.max_evaluations, len(pool))
    for g in rng.sample(pool, len(pool)):
        if len(evaluated) >= min(config.population, budget):
            break
        if fits_latency(g):
            evaluate(g)
        else:
            rejected.add(g)
    stale = 0
    while evaluated and len(evaluated) < budget and stale < MAX_STALE_CHILDREN:
        ranked = sorted(evaluated, key=lambda g: evaluated[g].val_loss)[: config.parents]
        if rng.random() < config.exploration_rate:  # keep exploring: now and then a fresh random member
            child = rng.choice(pool)
        else:
            a, b = rng.sample(ranked, 2) if len(ranked) > 1 else (ranked[0], ranked[0])
            child = search_space.mutate(search_space.crossover(a, b, rng), rng, config.mutation_rate)
        if child in evaluated or child in rejected:
            stale += 1
            continue
        if child not in allowed or not fits_latency(child):
            rejected.add(child)
            stale += 1
            continue
        stale = 0
        evaluate(child)


def _absolute_limits(
    config: SearchConfig, full_total: int, full_active: int, latency: LatencyProbe | None
) -> dict[str, float]:
    limits: dict[str, float] = {}
    if config.total_params is not None:
        limits["total_params"] = config.total_params
    elif config.total_params_fraction is not None:
        limits["total_params"] = config.total_params_fraction * full_total
    if config.active_params is not None:
        limits["active_params"] = config.active_params
    elif config.active_params_fraction is not None:
        limits["active_params"] = config.active_params_fraction * full_active
    if config.latency_ms is not None:
        limits["latency_ms"] = config.latency_ms
    elif config.latency_fraction is not None and latency is not None:
        limits["latency_ms"] = config.latency_fraction * latency(None)
    return limits


def check_parameter_budgets(config: SearchConfig, model_config: MoEConfig, space: ElasticSpace) -> None:
    """Before any compute: each parameter budget admits some sub-model of `space` (counts depend on how many
    layers and experts are kept, not which). ValueError naming the budget and the smallest achievable value."""
    _, genomes, _, costs = _family_costs(model_config, space, Importance.identity(model_config))
    full = subnet_cost(model_config)
    _check_parameter_budgets_reachable(
        _absolute_limits(config, full.total_params, full.active_params, None), genomes, costs
    )


def _family_costs(
    model_config: MoEConfig, space: ElasticSpace, importance: Importance
) -> tuple[SearchSpace, list[Genome], dict[Genome, SubnetSpec], dict[Genome, ModelCost]]:
    """The search space, its genomes, their sub-model specs and their parameter/FLOP accounting."""
    search_space = SearchSpace(space, model_config, importance)
    genomes = search_space.genomes()
    specs = {g: g.spec(model_config, importance) for g in genomes}
    return search_space, genomes, specs, {g: subnet_cost(model_config, specs[g]) for g in genomes}


def _check_parameter_budgets_reachable(
    limits: dict[str, float], genomes: list[Genome], costs: dict[Genome, ModelCost]
) -> None:
    """Each parameter budget on its own must admit some sub-model; name the smallest achievable value otherwise."""
    for key in ("total_params", "active_params"):
        if key in limits:
            smallest = min(getattr(costs[g], key) for g in genomes)
            if smallest > limits[key]:
                raise ValueError(
                    f"{key} budget {limits[key]:,.0f} is infeasible: the smallest sub-model has {smallest:,}"
                )


def _check_latency_budget_reachable(
    limits: dict[str, float],
    genomes: list[Genome],
    costs: dict[Genome, ModelCost],
    latency_of: Callable[[Genome], float],
) -> None:
    """The latency budget must admit the cheapest sub-model (by FLOPs), measured."""
    if "latency_ms" in limits:
        fastest_candidate = min(genomes, key=lambda g: costs[g].forward_flops_per_token)
        fastest = latency_of(fastest_candidate)
        if fastest > limits["latency_ms"]:
            raise ValueError(
                f"latency budget {limits['latency_ms']:.3f} ms/token is infeasible: the cheapest sub-model "
                f"measures {fastest:.3f} ms/token"
            )


def _describe(limits: dict[str, float]) -> str:
    return ", ".join(f"{k} <= {v:,.3f}" for k, v in limits.items()) or "no budgets"


# ---------------------------------------------------------------------------------------------------------
# The candidates table and how far the choice is from the runner-up (the task logs both)


def candidate_row(c: Candidate, batch_losses: list[float]) -> dict:
    return {
        "subnet": c.spec.describe(),
        "layers": " ".join(map(str, c.spec.layers)),
        "total_params": c.total_params,
        "active_params": c.active_params,
        "latency_ms": round(c.latency_ms, 4) if c.latency_ms is not None else None,
        "val_loss": round(c.val_loss, 5),
        "val_loss_stderr": round(_stderr(batch_losses), 5),
    }


def _stderr(values: list[float]) -> float:
    """Standard error of the mean; infinite for a single value (one batch says nothing about its noise)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf


@dataclass(frozen=True)
class ChoiceMargin:
    """How much better the chosen sub-model is than the next best, on the same validation batches."""

    runner_up: str
    margin: float  # runner-up's loss minus the chosen one's (>= 0)
    stderr: float  # of the paired per-batch differences
    batches: int

    @property
    def within_noise(self) -> bool:
        return self.margin < 2 * self.stderr

    def describe(self) -> str:
        verdict = "within the noise: another validation sample may pick it" if self.within_noise else "beyond the noise"
        return (
            f"{self.margin:.4f} ± {self.stderr:.4f} nats better than the runner-up {self.runner_up} (paired "
            f"standard error over {self.batches} validation batches; {verdict})"
        )


def choice_margin(result: SearchResult, batch_losses: dict[str, list[float]]) -> ChoiceMargin | None:
    """The chosen candidate against the runner-up; None when only one candidate was evaluated."""
    others = sorted((c for c in result.evaluated if c is not result.chosen), key=lambda c: c.val_loss)
    if not others:
        return None
    chosen, runner = batch_losses[_key(result.chosen.spec)], batch_losses[_key(others[0].spec)]
    diffs = [r - c for r, c in zip(runner, chosen, strict=True)]
    return ChoiceMargin(others[0].spec.describe(), statistics.fmean(diffs), _stderr(diffs), len(diffs))


class ValidationObjective:
    """The search's objective: a sub-model's validation loss on fixed batches, kept batch by batch so that two
    candidates' losses compare pairwise (`choice_margin`). With images and `image_loss_weight` w, each batch's loss is
    (1 - w) x the text's + w x the image-text documents' (the i-th batch of each stream)."""

    def __init__(self, model: ElasticMoE, data: PreparedData, config: SearchConfig) -> None:
        self.model, self.config = model, config
        weight = config.image_loss_weight if data.image_settings else 0.0
        self.streams = []  # (weight, tokens), only those that count
        if weight < 1:
            self.streams.append((1.0 - weight, data.split("val")))
        if weight > 0:
            self.streams.append((weight, data.image_split("val")))
        self.batch_losses: dict[str, list[float]] = {}

    def __call__(self, spec: SubnetSpec) -> float:
        config, device = self.config, next(self.model.parameters()).device
        shape = (config.eval_batch_size, config.seq_len, config.eval_batches)
        per_stream = [
            [share * loss for loss in panel_batch_losses(self.model, {"s": spec}, tokens, *shape, device)["s"]]
            for share, tokens in self.streams
        ]
        losses = self.batch_losses[_key(spec)] = [sum(parts) for parts in zip(*per_stream, strict=True)]
        return statistics.fmean(losses)


def _key(spec: SubnetSpec) -> str:
    return spec.model_dump_json()
