"""Extraction is exact: the standalone sub-model equals the masked supernet, and accounting is exact."""

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.accounting import subnet_cost
from models.config import MoEConfig
from models.extract import extract_subnet, subnet_config
from models.moe import ElasticMoE
from models.subnet import ElasticSpace, Importance, SubnetSpec


@pytest.fixture(scope="module")
def tokens(tiny_config: MoEConfig) -> torch.Tensor:
    return torch.randint(0, tiny_config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))


def _draw_spec(data: st.DataObject, config: MoEConfig) -> SubnetSpec:
    """Any sub-model: any layer subset (middle layers too), any expert subset per layer, any feasible top-k."""
    layers = sorted(data.draw(st.lists(st.integers(0, config.n_layers - 1), min_size=1, max_size=4, unique=True)))
    top_k = data.draw(st.integers(1, 3))
    experts = []
    for layer in layers:
        if config.is_moe_layer(layer):
            n = data.draw(st.integers(top_k, config.n_experts))
            experts.append(tuple(data.draw(st.permutations(range(config.n_experts)))[:n]))
        else:
            experts.append(())
    return SubnetSpec(layers=tuple(layers), experts=tuple(experts), top_k=top_k)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_extracted_equals_masked_supernet(
    data: st.DataObject, tiny_config: MoEConfig, tiny_supernet: ElasticMoE, tokens: torch.Tensor
) -> None:
    spec = _draw_spec(data, tiny_config)
    sub = extract_subnet(tiny_supernet, spec).eval()
    with torch.no_grad():
        masked = tiny_supernet(tokens, subnet=spec).logits
        standalone = sub(tokens).logits
    assert torch.allclose(masked, standalone, atol=1e-5, rtol=0), (masked - standalone).abs().max()
    cost = subnet_cost(tiny_config, spec)
    assert sub.num_parameters() == cost.total_params
    assert subnet_cost(sub.config).total_params == cost.total_params
    assert subnet_cost(sub.config).active_params == cost.active_params


def test_extracted_model_has_its_own_smaller_config(tiny_config: MoEConfig, tiny_supernet: ElasticMoE) -> None:
    spec = SubnetSpec(layers=(0, 2, 3), experts=((), (1, 3, 5), (0, 2, 4)), top_k=1)
    config = subnet_config(tiny_config, spec)
    assert (config.n_layers, config.first_dense_layers, config.n_experts, config.top_k) == (3, 1, 3, 1)
    assert config.layer_n_experts is None
    sub = extract_subnet(tiny_supernet, spec)
    assert sub.layers[1].mlp.gate.weight.shape == (3, tiny_config.d_model)
    assert torch.equal(sub.layers[1].mlp.gate.weight, tiny_supernet.layers[2].mlp.gate.weight[[1, 3, 5]])


def test_non_uniform_extraction_is_exact_and_says_so_in_its_config(
    tiny_supernet: ElasticMoE, tokens: torch.Tensor
) -> None:
    spec = SubnetSpec(layers=(1, 2), experts=((0, 1, 2, 3), (4, 5)), top_k=2)
    sub = extract_subnet(tiny_supernet, spec).eval()
    assert sub.config.layer_n_experts == (4, 2)
    with torch.no_grad():
        torch.testing.assert_close(sub(tokens).logits, tiny_supernet(tokens, subnet=spec).logits, atol=1e-5, rtol=0)


def test_extraction_carries_the_importance_orders(tiny_supernet: ElasticMoE) -> None:
    model = copy.deepcopy(tiny_supernet)
    model.set_importance(
        Importance(
            layer_order=(3, 0, 2, 1),
            expert_order=((), (5, 4, 3, 2, 1, 0), (2, 0, 1, 3, 4, 5), (0, 1, 2, 3, 4, 5)),
        )
    )
    spec = SubnetSpec(layers=(1, 2, 3), experts=((1, 4), (0, 2, 5), (0, 1)), top_k=1)
    imp = extract_subnet(model, spec).importance()
    assert imp.layer_order == (2, 1, 0)  # supernet order 3, 2, 1 renumbered to 2, 1, 0
    assert imp.expert_order[0] == (1, 0)  # kept (1, 4): 4 ranked before 1
    assert imp.expert_order[1] == (1, 0, 2)  # kept (0, 2, 5): order 2, 0, 5


def test_accounting_matches_the_full_model(tiny_config: MoEConfig) -> None:
    for config in (tiny_config, tiny_config.model_copy(update={"tie_embeddings": False, "n_shared_experts": 0})):
        assert ElasticMoE(config).num_parameters() == subnet_cost(config).total_params


def test_active_params_and_flops_shrink_with_top_k(tiny_config: MoEConfig) -> None:
    full = SubnetSpec.full(tiny_config)
    a, b = subnet_cost(tiny_config, full), subnet_cost(tiny_config, full.model_copy(update={"top_k": 1}))
    expert = 3 * tiny_config.d_model * tiny_config.expert_ffn_dim
    assert a.total_params == b.total_params
    assert a.active_params - b.active_params == 3 * expert  # three MoE layers, one expert fewer each
    assert a.forward_flops_per_token - b.forward_flops_per_token == 2 * 3 * expert


@pytest.mark.parametrize("seed", range(5))
def test_sampled_members_extract_exactly(
    seed: int, tiny_config: MoEConfig, tiny_supernet: ElasticMoE, tokens: torch.Tensor
) -> None:
    space = ElasticSpace(depths=(1, 2, 3, 4), expert_counts=(2, 3, 6), top_ks=(1, 2))
    spec = space.sample(tiny_config, tiny_supernet.importance(), random.Random(seed))
    with torch.no_grad():
        torch.testing.assert_close(
            extract_subnet(tiny_supernet, spec)(tokens).logits,
            tiny_supernet(tokens, subnet=spec).logits,
            atol=1e-5,
            rtol=0,
        )
