"""ERNIE 4.5's heterogeneous routing: text tokens are routed among the text experts and image codes among the image
experts, each with the softmax of its own pool, balanced per pool, with the router orthogonal loss; the elastic
family keeps both pools, extraction stays exact, and shared routing is untouched."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

from models.config import MoEConfig
from models.extract import extract_subnet, subnet_config
from models.moe import ElasticMoE, orthogonal_loss, pool_balancing_loss, pool_mask, route_top_k
from models.onnx_forward import ExportableDecoder
from models.subnet import ElasticSpace, Importance
from tasks.deploy.graph_limits import fused_graph_blockers
from tasks.pipeline_config import load_pipeline_config

SHAPE = {
    "vocab_size": 60,
    "d_model": 32,
    "n_layers": 3,
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_experts": 8,
    "top_k": 2,
    "expert_ffn_dim": 16,
    "first_dense_layers": 1,
    "dense_ffn_dim": 48,
    "max_seq_len": 64,
    "image_token_range": (40, 20),
}
HETEROGENEOUS = MoEConfig(**SHAPE, routing="heterogeneous", n_image_experts=4, orthogonal_loss_coef=0.1)


def random_model(config: MoEConfig, seed: int = 0) -> ElasticMoE:
    torch.manual_seed(seed)
    model = ElasticMoE(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def mixed_tokens() -> torch.Tensor:
    """Text ids below 40, image codes 40..59, both in every row."""
    generator = torch.Generator().manual_seed(1)
    return torch.cat([torch.randint(0, 40, (3, 10), generator=generator), torch.randint(40, 60, (3, 6))], dim=1)


def test_each_token_is_routed_within_its_pool_with_that_pool_s_softmax() -> None:
    """Experts 0, 1 serve text and 2, 3 images. Hand-set router rows make expert 2 the best for every token; a
    text token must still choose among 0 and 1, with the softmax over those two only, whatever the bias says."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [-1.0, 0.5]])
    bias = torch.tensor([0.0, 0.0, 10.0, 10.0])  # a bias that would pick the image experts for everyone
    is_image = torch.tensor([False, False, True])
    mask = pool_mask(torch.tensor([False, False, True, True]), is_image)
    _, weights, chosen = route_top_k(hidden, weight, bias, 1, 1e-12, mask)
    logits = hidden @ weight.T
    assert chosen[:, 0].tolist() == [0, 1, 2]
    assert weights[:, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # top-1: renormalised to 1
    _, weights2, chosen2 = route_top_k(hidden, weight, torch.zeros(4), 2, 1e-12, mask)
    assert sorted(chosen2[0].tolist()) == [0, 1] and sorted(chosen2[2].tolist()) == [2, 3]
    text_softmax = torch.softmax(logits[0, :2], dim=0)
    assert weights2[0].tolist() == pytest.approx(text_softmax[chosen2[0]].tolist())


def test_shared_routing_is_unchanged_by_an_image_token_range(mixed_tokens: torch.Tensor) -> None:
    plain = {key: value for key, value in SHAPE.items() if key != "image_token_range"}
    without, with_range = random_model(MoEConfig(**plain)), random_model(MoEConfig(**SHAPE))
    assert torch.equal(without(mixed_tokens).logits, with_range(mixed_tokens).logits)


def test_the_pool_balancing_loss_by_hand() -> None:
    """4 tokens, 2 text experts and 2 image experts, top-1. Text tokens 0, 1 choose experts 0, 1 with
    probabilities (.5, .5) each: f = (.5, .5), P = (.5, .5), 2 x (.25 + .25) = 1. Image tokens 2, 3 both choose
    expert 2 with probabilities (.75, .25) and (.25, .75): f = (1, 0), P = (.5, .5), 2 x .5 = 1. Each pool has half
    the tokens: 0.5 x 1 + 0.5 x 1 = 1.0. Moving token 3 to expert 3 leaves the loss at 1.0 (balanced)."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.75, 0.25], [0.0, 0.0, 0.25, 0.75]])
    image_experts = torch.tensor([False, False, True, True])
    is_image = torch.tensor([False, False, True, True])
    loss = pool_balancing_loss(probs, torch.tensor([[0], [1], [2], [2]]), image_experts, is_image)
    assert float(loss) == pytest.approx(1.0)
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.9, 0.1]])
    skewed = pool_balancing_loss(probs, torch.tensor([[0], [1], [2], [2]]), image_experts, is_image)
    assert float(skewed) == pytest.approx(0.5 * 1.0 + 0.5 * 2 * 0.9)  # the image pool all on expert 2


def test_the_router_orthogonal_loss_matches_ernie_s_own_case() -> None:
    assert float(orthogonal_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]) / torch.tensor([[1.0], [math.sqrt(2)]]))) == (
        pytest.approx(0.25)
    )
    assert float(orthogonal_loss(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]]))) == pytest.approx(0.0)
    model = random_model(HETEROGENEOUS)
    with torch.no_grad():
        out = model(torch.randint(0, 60, (2, 8)))
    without = out.balancing_loss(HETEROGENEOUS.model_copy(update={"orthogonal_loss_coef": 0.0}))
    expected = 0.1 * torch.stack([s.orthogonal_loss for s in out.routing]).mean()
    assert float(out.balancing_loss(HETEROGENEOUS) - without) == pytest.approx(float(expected))
    assert all(float(s.orthogonal_loss) > 0 for s in out.routing)


def test_the_model_routes_text_to_text_experts_and_codes_to_image_experts(mixed_tokens: torch.Tensor) -> None:
    model = random_model(HETEROGENEOUS)
    out = model(mixed_tokens)
    is_image = (mixed_tokens >= 40).reshape(-1)
    for stats in out.routing:
        assert (stats.assignments[~is_image] < 4).all() and (stats.assignments[is_image] >= 4).all()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.balancing_loss(HETEROGENEOUS))


@pytest.mark.parametrize("seed", range(4))
def test_sampled_members_keep_both_pools_and_extract_exactly(seed: int, mixed_tokens: torch.Tensor) -> None:
    model = random_model(HETEROGENEOUS)
    space = ElasticSpace(depths=(2, 3), expert_counts=(2, 3, 4), top_ks=(1, 2))
    spec = space.sample(HETEROGENEOUS, model.importance(), random.Random(seed))
    for kept in spec.experts:
        if kept:
            assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) >= spec.top_k
    sub = extract_subnet(model, spec)
    assert sub.config.n_image_experts == len(spec.experts[-1]) // 2
    with torch.no_grad():
        torch.testing.assert_close(sub(mixed_tokens).logits, model(mixed_tokens, subnet=spec).logits, atol=1e-5, rtol=0)


def test_the_most_important_experts_are_taken_from_each_pool() -> None:
    order = (6, 2, 7, 0, 5, 1, 4, 3)
    importance = Importance(layer_order=(0, 1, 2), expert_order=((), order, order))
    spec = importance.spec(HETEROGENEOUS, depth=3, n_experts=2, top_k=1)
    assert spec.experts == ((), (0, 2, 6, 7), (0, 2, 6, 7))
    shared = MoEConfig(**SHAPE)
    assert importance.spec(shared, depth=3, n_experts=2, top_k=1).experts == ((), (2, 6), (2, 6))


def test_shared_routing_samples_exactly_the_members_it_sampled_before() -> None:
    """One pool draws `rng.sample(range(E), n)`, the call earlier runs made: their streams and caches stay valid."""
    config = MoEConfig(**SHAPE)
    space = ElasticSpace(depths=(2, 3), expert_counts=(2, 4), top_ks=(1, 2))
    identity = Importance.identity(config)
    for seed in range(5):
        rng, replay = random.Random(seed), random.Random(seed)
        spec = space.sample(config, identity, rng)
        depth, n = replay.choice(space.depths), replay.choice(space.expert_counts)
        replay.choice([k for k in space.top_ks if k <= n])
        layers = sorted(replay.sample(range(3), depth))
        experts = [tuple(sorted(replay.sample(range(8), n))) if layer >= 1 else () for layer in layers]
        assert (spec.layers, spec.experts) == (tuple(layers), tuple(experts))


def test_selection_biases_move_against_their_own_pool_s_mean_load(mixed_tokens: torch.Tensor) -> None:
    model = random_model(HETEROGENEOUS.model_copy(update={"load_balancing": "bias", "bias_update_rate": 0.1}))
    before = model.layers[1].mlp.gate.e_score_correction_bias.clone()
    stats = model(mixed_tokens).routing[0]
    model.update_routing_bias([stats])
    moved = model.layers[1].mlp.gate.e_score_correction_bias - before
    for pool in (slice(0, 4), slice(4, 8)):
        load = stats.expert_load[pool]
        torch.testing.assert_close(moved[pool], 0.1 * torch.sign(load.mean() - load))


def test_the_onnx_forward_routes_by_the_ids_as_the_model_does(mixed_tokens: torch.Tensor) -> None:
    model = random_model(HETEROGENEOUS)
    decoder = ExportableDecoder(model).eval()
    with torch.no_grad():
        logits = decoder(mixed_tokens, ExportableDecoder.no_padding(3), *decoder.empty_past(3))[0]
        torch.testing.assert_close(logits, model(mixed_tokens).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"routing": "heterogeneous", "n_image_experts": 4, "image_token_range": None}, "needs image_token_range"),
        ({"n_image_experts": 4}, "n_image_experts=4 needs routing=heterogeneous"),
        ({"routing": "heterogeneous", "n_image_experts": 7}, r"allowed: 1..7, leaving at least top_k=2 in each"),
        ({"image_token_range": (50, 20)}, r"image_token_range=\(50, 20\): the codes must lie in the vocabulary"),
    ],
)
def test_bad_routing_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MoEConfig(**{**SHAPE, **fields})


def test_a_heterogeneous_model_leaves_as_a_traced_onnx_graph_only() -> None:
    with pytest.raises(ValueError, match="routing=heterogeneous: Ernie4_5_MoeForCausalLM routes every token in one"):
        HETEROGENEOUS.to_hf_dict()
    assert any("routing=heterogeneous" in reason for reason in fused_graph_blockers(HETEROGENEOUS, None))
    config = load_pipeline_config("tiny-images-het")
    assert config.pretrain.model.image_token_range == (1026, 128) and config.deploy.graph == "traced"
    assert (
        subnet_config(
            config.pretrain.model,
            config.pretrain.elastic.smallest(config.pretrain.model, Importance.identity(config.pretrain.model)),
        ).n_image_experts
        == 2
    )
    with pytest.raises(ValidationError, match="turn off deploy.hugging_face, deploy.graph=fused"):
        load_pipeline_config("tiny-images-het", {"deploy.hugging_face": True, "deploy.graph": "fused"})
    with pytest.raises(ValidationError, match="needs image_token_range"):
        load_pipeline_config("tiny", {"pretrain.model.routing": "heterogeneous"})
    with pytest.raises(ValidationError, match=r"image_token_range=\(1000, 128\) must be \(1026, 128\)"):
        load_pipeline_config("tiny-images", {"pretrain.model.image_token_range": [1000, 128]})
