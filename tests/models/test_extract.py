"""Extraction is exact: the standalone sub-model equals the masked supernet, and accounting is exact."""

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

CONFIG = MoEConfig(
    vocab_size=97,
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    n_experts=6,
    top_k=2,
    expert_ffn_dim=16,
    n_shared_experts=1,
    first_dense_layers=1,
    dense_ffn_dim=48,
    max_seq_len=64,
)


def _supernet(config: MoEConfig = CONFIG) -> ElasticMoE:
    torch.manual_seed(0)
    model = ElasticMoE(config).eval()
    with torch.no_grad():  # a non-zero selection bias, so exactness also covers bias-driven selection
        for layer in model.layers[config.first_dense_layers :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


SUPERNET = _supernet()
TOKENS = torch.randint(0, CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))


@st.composite
def specs(draw: st.DrawFn) -> SubnetSpec:
    layers = draw(st.lists(st.integers(0, CONFIG.n_layers - 1), min_size=1, max_size=4, unique=True))
    top_k = draw(st.integers(1, 3))
    experts = []
    for layer in sorted(layers):
        if CONFIG.is_moe_layer(layer):
            n = draw(st.integers(top_k, CONFIG.n_experts))
            experts.append(tuple(draw(st.permutations(range(CONFIG.n_experts)))[:n]))
        else:
            experts.append(())
    return SubnetSpec(layers=tuple(sorted(layers)), experts=tuple(experts), top_k=top_k)


@settings(max_examples=60, deadline=None)
@given(spec=specs())
def test_extracted_equals_masked_supernet(spec: SubnetSpec) -> None:
    sub = extract_subnet(SUPERNET, spec).eval()
    with torch.no_grad():
        masked = SUPERNET(TOKENS, subnet=spec).logits
        standalone = sub(TOKENS).logits
    assert torch.allclose(masked, standalone, atol=1e-5, rtol=0), (masked - standalone).abs().max()
    cost = subnet_cost(CONFIG, spec)
    assert sub.num_parameters() == cost.total_params
    assert subnet_cost(sub.config).total_params == cost.total_params
    assert subnet_cost(sub.config).active_params == cost.active_params


def test_extracted_model_has_its_own_smaller_config() -> None:
    spec = SubnetSpec(layers=(0, 2, 3), experts=((), (1, 3, 5), (0, 2, 4)), top_k=1)
    config = subnet_config(CONFIG, spec)
    assert (config.n_layers, config.first_dense_layers, config.n_experts, config.top_k) == (3, 1, 3, 1)
    assert config.layer_n_experts is None
    sub = extract_subnet(SUPERNET, spec)
    assert sub.layers[1].mlp.gate.weight.shape == (3, CONFIG.d_model)
    assert torch.equal(sub.layers[1].mlp.gate.weight, SUPERNET.layers[2].mlp.gate.weight[[1, 3, 5]])


def test_non_uniform_extraction_is_exact_and_says_so_in_its_config() -> None:
    spec = SubnetSpec(layers=(1, 2), experts=((0, 1, 2, 3), (4, 5)), top_k=2)
    sub = extract_subnet(SUPERNET, spec).eval()
    assert sub.config.layer_n_experts == (4, 2)
    with torch.no_grad():
        torch.testing.assert_close(sub(TOKENS).logits, SUPERNET(TOKENS, subnet=spec).logits, atol=1e-5, rtol=0)


def test_extraction_carries_the_importance_orders() -> None:
    model = _supernet()
    model.set_importance(
        Importance(
            layer_order=(3, 0, 2, 1),
            expert_order=((), (5, 4, 3, 2, 1, 0), (2, 0, 1, 3, 4, 5), (0, 1, 2, 3, 4, 5)),
        )
    )
    spec = SubnetSpec(layers=(1, 2, 3), experts=((1, 4), (0, 2, 5), (0, 1)), top_k=1)
    sub = extract_subnet(model, spec)
    imp = sub.importance()
    assert imp.layer_order == (2, 1, 0)  # supernet order 3, 2, 1 renumbered to 2, 1, 0
    assert imp.expert_order[0] == (1, 0)  # kept (1, 4): 4 ranked before 1
    assert imp.expert_order[1] == (1, 0, 2)  # kept (0, 2, 5): order 2, 0, 5


def test_accounting_matches_the_full_model() -> None:
    for config in (CONFIG, CONFIG.model_copy(update={"tie_embeddings": False, "n_shared_experts": 0})):
        model = ElasticMoE(config)
        assert model.num_parameters() == subnet_cost(config).total_params


def test_active_params_and_flops_shrink_with_top_k() -> None:
    full = SubnetSpec.full(CONFIG)
    k1 = full.model_copy(update={"top_k": 1})
    a, b = subnet_cost(CONFIG, full), subnet_cost(CONFIG, k1)
    expert = 3 * CONFIG.d_model * CONFIG.expert_ffn_dim
    assert a.total_params == b.total_params
    assert a.active_params - b.active_params == 3 * expert  # three MoE layers, one expert fewer each
    assert a.forward_flops_per_token - b.forward_flops_per_token == 2 * 3 * expert


@pytest.mark.parametrize("seed", range(5))
def test_sampled_members_extract_exactly(seed: int) -> None:
    space = ElasticSpace(depths=(1, 2, 3, 4), expert_counts=(2, 3, 6), top_ks=(1, 2))
    spec = space.sample(CONFIG, SUPERNET.importance(), random.Random(seed))
    with torch.no_grad():
        torch.testing.assert_close(
            extract_subnet(SUPERNET, spec)(TOKENS).logits, SUPERNET(TOKENS, subnet=spec).logits, atol=1e-5, rtol=0
        )
