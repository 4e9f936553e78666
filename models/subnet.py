"""Sub-network specs, importance orders and the elastic space.

A `SubnetSpec` names one member of the model family: which supernet layers run, which routed experts each
kept MoE layer keeps, and the routing top-k. `ElasticSpace` says which members exist (allowed depths,
expert counts, top-k values) and how training samples them.
"""

from __future__ import annotations

import itertools
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.config import MoEConfig


def _strictly_ascending(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    ordered = tuple(sorted(values))
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"{what} has duplicates: {values}")
    if ordered and ordered[0] < 0:
        raise ValueError(f"{what} has a negative index: {values}")
    return ordered


class SubnetSpec(BaseModel):
    """One sub-model of the supernet; frozen and hashable so it can key caches and registry tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: tuple[int, ...] = Field(
        min_length=1, description="Supernet layer indices that run (any subset, stored ascending)."
    )
    experts: tuple[tuple[int, ...], ...] = Field(
        description="One entry per kept layer: the routed experts it keeps (ascending); () for a dense layer."
    )
    top_k: int = Field(ge=1, le=1024, description="Experts each token is routed to in this sub-model.")

    @field_validator("layers")
    @classmethod
    def _sort_layers(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        return _strictly_ascending(layers, "layers")

    @model_validator(mode="before")
    @classmethod
    def _sort_experts_with_layers(cls, data: object) -> object:
        # Experts are given per kept layer, so sorting the layers must carry their expert lists along.
        if isinstance(data, dict) and "layers" in data and "experts" in data:
            layers, experts = list(data["layers"]), list(data["experts"])
            if len(layers) == len(experts):
                pairs = sorted(zip(layers, experts, strict=True), key=lambda p: p[0])
                data = {
                    **data,
                    "layers": tuple(p[0] for p in pairs),
                    "experts": tuple(tuple(p[1]) for p in pairs),
                }
        return data

    @field_validator("experts")
    @classmethod
    def _sort_each_layer_experts(cls, experts: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        return tuple(_strictly_ascending(kept, f"experts[{i}]") for i, kept in enumerate(experts))

    @model_validator(mode="after")
    def _one_entry_per_layer(self) -> SubnetSpec:
        if len(self.experts) != len(self.layers):
            raise ValueError(
                f"experts has {len(self.experts)} entries but layers has {len(self.layers)}: one per kept layer"
            )
        return self

    def check_fits(self, config: MoEConfig) -> None:
        """Raise ValueError naming the offending field when this spec is not a sub-model of `config`."""
        if self.layers[-1] >= config.n_layers:
            raise ValueError(f"layers: index {self.layers[-1]} out of range [0, {config.n_layers - 1}]")
        for layer, kept in zip(self.layers, self.experts, strict=True):
            available = config.experts_in_layer(layer)
            if available == 0:
                if kept:
                    raise ValueError(f"experts: layer {layer} is dense and keeps no experts, got {kept}")
                continue
            if not kept:
                raise ValueError(f"experts: MoE layer {layer} must keep at least 1 expert")
            if kept[-1] >= available:
                raise ValueError(f"experts: layer {layer} index {kept[-1]} out of range [0, {available - 1}]")
            if self.top_k > len(kept):
                raise ValueError(f"top_k={self.top_k} exceeds the {len(kept)} experts kept in layer {layer}")
            pools = config.expert_pools(layer)
            if len(pools) > 1:
                in_pool = [sum(1 for e in kept if e in pool) for pool in pools]
                if min(in_pool) < self.top_k:
                    raise ValueError(
                        f"experts: layer {layer} keeps {in_pool[0]} text and {in_pool[1]} image experts; "
                        f"heterogeneous routing needs at least top_k={self.top_k} in each pool"
                    )

    @property
    def moe_expert_counts(self) -> tuple[int, ...]:
        return tuple(len(e) for e in self.experts if e)

    def describe(self) -> str:
        """Short human-readable label, e.g. `L3 E4-6 k2`."""
        counts = self.moe_expert_counts
        experts = (
            f"{min(counts)}"
            if counts and min(counts) == max(counts)
            else (f"{min(counts)}-{max(counts)}" if counts else "0")
        )
        return f"L{len(self.layers)} E{experts} k{self.top_k}"

    @classmethod
    def full(cls, config: MoEConfig) -> SubnetSpec:
        """The spec of the whole supernet."""
        return cls(
            layers=tuple(range(config.n_layers)),
            experts=tuple(tuple(range(config.experts_in_layer(i))) for i in range(config.n_layers)),
            top_k=config.top_k,
        )


class Importance(BaseModel):
    """Orders of layers and experts from most to least important; stored with the model's weights.

    Identity until a ranking stage measures them (routing mass for experts, contribution for layers).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer_order: tuple[int, ...] = Field(description="All supernet layers, most important first.")
    expert_order: tuple[tuple[int, ...], ...] = Field(
        description="Per supernet layer: its routed experts, most important first; () for a dense layer."
    )

    @classmethod
    def identity(cls, config: MoEConfig) -> Importance:
        return cls(
            layer_order=tuple(range(config.n_layers)),
            expert_order=tuple(tuple(range(config.experts_in_layer(i))) for i in range(config.n_layers)),
        )

    def check_fits(self, config: MoEConfig) -> None:
        if sorted(self.layer_order) != list(range(config.n_layers)):
            raise ValueError(f"layer_order must be a permutation of range({config.n_layers})")
        if len(self.expert_order) != config.n_layers:
            raise ValueError(f"expert_order needs {config.n_layers} entries, got {len(self.expert_order)}")
        for layer, order in enumerate(self.expert_order):
            if sorted(order) != list(range(config.experts_in_layer(layer))):
                raise ValueError(
                    f"expert_order of layer {layer} must be a permutation of range({config.experts_in_layer(layer)})"
                )

    def spec(self, config: MoEConfig, depth: int, n_experts: int, top_k: int) -> SubnetSpec:
        """The sub-model keeping the `depth` most important layers and the `n_experts` most important experts of
        each expert pool (heterogeneous routing keeps that many text and that many image experts)."""
        layers = sorted(self.layer_order[:depth])
        experts = [most_important(self.expert_order[i], config.expert_pools(i), n_experts) for i in layers]
        return SubnetSpec(layers=tuple(layers), experts=tuple(experts), top_k=top_k)


def most_important(order: tuple[int, ...], pools: tuple[range, ...], n: int) -> tuple[int, ...]:
    """The first `n` experts of `order` from each pool (with one pool: `order[:n]`)."""
    return tuple(expert for pool in pools for expert in [e for e in order if e in pool][:n])


LayerSampling = Literal["random", "keep_ends", "nested"]
ExpertSampling = Literal["random", "nested"]
ExpertRanking = Literal["routing_mass", "reap"]


def _skewed_choice(values: tuple[int, ...] | list[int], rng: random.Random, skew: float) -> int:
    """The i-th smallest value with probability proportional to (i + 1)^skew; skew 0 is `rng.choice` itself, so
    uniform sampling keeps the random stream earlier runs drew."""
    if skew == 0:
        return rng.choice(values)
    return rng.choices(values, weights=[(i + 1) ** skew for i in range(len(values))])[0]


class ElasticSpace(BaseModel):
    """Which sub-models exist and how training samples them (ERNIE 5.0: depth, expert count and top-k)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depths: tuple[int, ...] = Field((2, 3, 4), min_length=1, description="Allowed numbers of kept layers.")
    expert_counts: tuple[int, ...] = Field(
        (4, 6, 8),
        min_length=1,
        description="Allowed numbers of routed experts kept in each MoE layer (with heterogeneous routing, in "
        "each of its text and image pools).",
    )
    top_ks: tuple[int, ...] = Field((1, 2), min_length=1, description="Allowed routing top-k values.")
    layer_sampling: LayerSampling = Field(
        "random",
        description="`random`: skip any layers (ERNIE 5.0 skips middle layers too); `keep_ends`: random but "
        "the first and last layers always run; `nested`: keep the most important layers (Once-for-All style).",
    )
    expert_sampling: ExpertSampling = Field(
        "random",
        description="`random`: a random expert subset per layer, so every subset trains; `nested`: the most "
        "important prefix (MatFormer style), so extraction keeps exactly what was trained.",
    )
    expert_ranking: ExpertRanking = Field(
        "routing_mass",
        description="How experts are ranked (re-ranking during training, calibration before the search): "
        "`routing_mass`, the mean gate probability; `reap`, router-weighted activation saliency, the mean of "
        "gate weight x expert output norm over the tokens routed to the expert (REAP).",
    )

    @field_validator("depths", "expert_counts", "top_ks")
    @classmethod
    def _positive_sorted(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if min(values) < 1:
            raise ValueError(f"values must be >= 1, got {values}")
        return tuple(sorted(set(values)))

    @model_validator(mode="after")
    def _some_topk_fits(self) -> ElasticSpace:
        if self.top_ks[0] > self.expert_counts[0]:
            raise ValueError(
                f"top_ks: the smallest top-k {self.top_ks[0]} exceeds the smallest expert count "
                f"{self.expert_counts[0]}, so the smallest sub-model cannot route"
            )
        return self

    def check_fits(self, config: MoEConfig) -> None:
        """Raise ValueError naming the field when the space asks for more than the supernet has."""
        if self.depths[-1] > config.n_layers:
            raise ValueError(f"depths: {self.depths[-1]} exceeds the supernet's n_layers={config.n_layers}")
        if self.layer_sampling == "keep_ends" and self.depths[0] < min(2, config.n_layers):
            raise ValueError("depths: layer_sampling=keep_ends needs every depth >= 2")
        fewest = min((len(pool) for i in config.moe_layers for pool in config.expert_pools(i)), default=0)
        if config.moe_layers and self.expert_counts[-1] > fewest:
            pools = "pool" if config.routing == "heterogeneous" else "layer"
            raise ValueError(f"expert_counts: {self.expert_counts[-1]} exceeds the {fewest} experts of a {pools}")
        if self.top_ks[-1] > max(self.expert_counts):
            raise ValueError(f"top_ks: {self.top_ks[-1]} exceeds every allowed expert count")

    def _top_ks_for(self, n_experts: int) -> list[int]:
        return [k for k in self.top_ks if k <= n_experts]

    def largest(self, config: MoEConfig, importance: Importance) -> SubnetSpec:
        n = self.expert_counts[-1]
        return importance.spec(config, self.depths[-1], n, self._top_ks_for(n)[-1])

    def smallest(self, config: MoEConfig, importance: Importance) -> SubnetSpec:
        return importance.spec(config, self.depths[0], self.expert_counts[0], self.top_ks[0])

    def enumerate(self, config: MoEConfig, importance: Importance) -> list[SubnetSpec]:
        """Every importance-ordered member (depth x expert count x top-k), smallest first."""
        return [
            importance.spec(config, depth, n, k)
            for depth, n in itertools.product(self.depths, self.expert_counts)
            for k in self._top_ks_for(n)
        ]

    def sample(self, config: MoEConfig, importance: Importance, rng: random.Random, skew: float = 0.0) -> SubnetSpec:
        """A random member: random depth, kept layers, expert count, expert subset and top-k; `skew` > 0 favours
        the larger values of each dimension (see `_skewed_choice`)."""
        depth = _skewed_choice(self.depths, rng, skew)
        n_experts = _skewed_choice(self.expert_counts, rng, skew)
        top_k = _skewed_choice(self._top_ks_for(n_experts), rng, skew)
        layers = self._sample_layers(config, importance, depth, rng)
        experts: list[tuple[int, ...]] = []
        for layer in layers:
            if not config.is_moe_layer(layer):
                experts.append(())
            elif self.expert_sampling == "nested":
                experts.append(most_important(importance.expert_order[layer], config.expert_pools(layer), n_experts))
            else:  # per pool; with one pool exactly the draw of earlier runs
                experts.append(tuple(e for pool in config.expert_pools(layer) for e in rng.sample(pool, n_experts)))
        return SubnetSpec(layers=tuple(layers), experts=tuple(experts), top_k=top_k)

    def trained_order(self, stored: Importance, measured: Importance) -> Importance:
        """The order to cut sub-models by after training: a nested dimension keeps the order training used
        (`stored`: its prefixes are what was trained), the others take the `measured` one."""
        return Importance(
            layer_order=stored.layer_order if self.layer_sampling == "nested" else measured.layer_order,
            expert_order=stored.expert_order if self.expert_sampling == "nested" else measured.expert_order,
        )

    def _sample_layers(self, config: MoEConfig, importance: Importance, depth: int, rng: random.Random) -> list[int]:
        n = config.n_layers
        if self.layer_sampling == "nested":
            return sorted(importance.layer_order[:depth])
        if self.layer_sampling == "keep_ends" and n >= 2:
            middle = rng.sample(range(1, n - 1), depth - 2) if depth > 2 else []
            return sorted([0, n - 1, *middle])
        return sorted(rng.sample(range(n), depth))
