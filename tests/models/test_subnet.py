"""Sub-network specs, importance orders and the elastic space."""

import random

import pytest
from pydantic import ValidationError

from models.config import MoEConfig
from models.subnet import ElasticSpace, Importance, SubnetSpec


def test_spec_is_canonical_hashable_and_round_trips_json() -> None:
    spec = SubnetSpec(layers=(3, 0), experts=((5, 1), (2, 0)), top_k=1)
    assert spec.layers == (0, 3)
    assert spec.experts == ((0, 2), (1, 5))  # each layer's experts travel with it, sorted
    same = SubnetSpec.model_validate_json(spec.model_dump_json())
    assert same == spec and hash(same) == hash(spec)
    assert len({spec, same}) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": (0, 0), "experts": ((0,), (0,)), "top_k": 1}, "layers has duplicates"),
        ({"layers": (0, 1), "experts": ((0,),), "top_k": 1}, "experts has 1 entries but layers has 2"),
        ({"layers": (), "experts": (), "top_k": 1}, "layers"),
        ({"layers": (0,), "experts": ((1, 1),), "top_k": 1}, "experts[0] has duplicates"),
    ],
)
def test_malformed_spec_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        SubnetSpec(**kwargs)
    assert message in str(error.value)


def test_spec_must_fit_the_supernet(tiny_config: MoEConfig) -> None:
    with pytest.raises(ValueError, match=r"layers: index 4 out of range \[0, 3\]"):
        SubnetSpec(layers=(4,), experts=((0,),), top_k=1).check_fits(tiny_config)
    with pytest.raises(ValueError, match="layer 0 is dense"):
        SubnetSpec(layers=(0,), experts=((1,),), top_k=1).check_fits(tiny_config)
    with pytest.raises(ValueError, match=r"layer 1 index 6 out of range \[0, 5\]"):
        SubnetSpec(layers=(1,), experts=((6,),), top_k=1).check_fits(tiny_config)
    with pytest.raises(ValueError, match="top_k=2 exceeds the 1 experts kept in layer 2"):
        SubnetSpec(layers=(1, 2), experts=((0, 1), (3,)), top_k=2).check_fits(tiny_config)


def test_importance_spec_keeps_the_most_important(tiny_config: MoEConfig) -> None:
    importance = Importance(
        layer_order=(2, 0, 3, 1),
        expert_order=((), (5, 4, 3, 2, 1, 0), (0, 1, 2, 3, 4, 5), (3, 1, 5, 0, 2, 4)),
    )
    importance.check_fits(tiny_config)
    spec = importance.spec(tiny_config, depth=3, n_experts=2, top_k=1)
    assert spec.layers == (0, 2, 3)
    assert spec.experts == ((), (0, 1), (1, 3))


def test_bad_importance_is_rejected(tiny_config: MoEConfig) -> None:
    with pytest.raises(ValueError, match="layer_order must be a permutation"):
        Importance(layer_order=(0, 0, 1, 2), expert_order=((),) * 4).check_fits(tiny_config)


def test_space_members_fit_and_cover_the_space(tiny_config: MoEConfig) -> None:
    space = ElasticSpace(depths=(2, 3, 4), expert_counts=(2, 4, 6), top_ks=(1, 2))
    space.check_fits(tiny_config)
    importance = Importance.identity(tiny_config)
    rng = random.Random(0)
    seen_depths, seen_counts, seen_k, seen_layers = set(), set(), set(), set()
    for _ in range(300):
        spec = space.sample(tiny_config, importance, rng)
        spec.check_fits(tiny_config)
        seen_depths.add(len(spec.layers))
        seen_counts.update(spec.moe_expert_counts)
        seen_k.add(spec.top_k)
        seen_layers.add(spec.layers)
    assert seen_depths == {2, 3, 4} and seen_counts == {2, 4, 6} and seen_k == {1, 2}
    assert (0, 2) in seen_layers or (1, 2) in seen_layers  # middle layers get skipped too, not only a prefix
    members = space.enumerate(tiny_config, importance)
    assert len(members) == 3 * 3 * 2 and len(set(members)) == len(members)
    assert space.smallest(tiny_config, importance) == SubnetSpec(layers=(0, 1), experts=((), (0, 1)), top_k=1)
    assert space.largest(tiny_config, importance) == SubnetSpec.full(tiny_config)


def test_keep_ends_and_nested_sampling(tiny_config: MoEConfig) -> None:
    importance = Importance(
        layer_order=(3, 1, 0, 2), expert_order=((), (5, 4, 3, 2, 1, 0), (0, 1, 2, 3, 4, 5), (1, 0, 2, 3, 4, 5))
    )
    rng = random.Random(1)
    keep_ends = ElasticSpace(depths=(2, 3), expert_counts=(2, 4), top_ks=(1,), layer_sampling="keep_ends")
    nested = ElasticSpace(
        depths=(2, 3), expert_counts=(2, 4), top_ks=(1,), layer_sampling="nested", expert_sampling="nested"
    )
    for _ in range(50):
        spec = keep_ends.sample(tiny_config, importance, rng)
        assert spec.layers[0] == 0 and spec.layers[-1] == 3
        spec = nested.sample(tiny_config, importance, rng)
        assert set(spec.layers) == set(importance.layer_order[: len(spec.layers)])
        for layer, kept in zip(spec.layers, spec.experts, strict=True):
            if kept:
                assert set(kept) == set(importance.expert_order[layer][: len(kept)])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (dict(depths=(5,)), "depths: 5 exceeds the supernet's n_layers=4"),
        (dict(expert_counts=(2, 8)), "expert_counts: 8 exceeds the 6 experts of a layer"),
        (dict(depths=(1, 2), layer_sampling="keep_ends"), "keep_ends needs every depth >= 2"),
    ],
)
def test_space_that_does_not_fit_is_rejected(tiny_config: MoEConfig, space: dict, message: str) -> None:
    base = {"depths": (2, 3), "expert_counts": (2, 4), "top_ks": (1, 2)}
    with pytest.raises(ValueError, match=message):
        ElasticSpace(**{**base, **space}).check_fits(tiny_config)


def test_space_whose_smallest_cannot_route_is_rejected() -> None:
    with pytest.raises(ValidationError, match="smallest top-k 3 exceeds the smallest expert count 2"):
        ElasticSpace(depths=(2,), expert_counts=(2, 4), top_ks=(3,))


def test_nested_dimensions_keep_the_order_they_were_trained_in(tiny_config) -> None:
    from models.subnet import ElasticSpace, Importance

    stored = Importance.identity(tiny_config)
    measured = Importance(
        layer_order=(3, 2, 1, 0), expert_order=((),) + tuple(tuple(range(5, -1, -1)) for _ in range(3))
    )
    nested = ElasticSpace(depths=(2, 4), expert_counts=(2, 6), expert_sampling="nested").trained_order(stored, measured)
    assert nested.expert_order == stored.expert_order and nested.layer_order == measured.layer_order
    both = ElasticSpace(depths=(2, 4), expert_counts=(2, 6), layer_sampling="nested", expert_sampling="nested")
    assert both.trained_order(stored, measured) == stored
    assert ElasticSpace(depths=(2, 4), expert_counts=(2, 6)).trained_order(stored, measured) == measured
