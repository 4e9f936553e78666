"""Behaviour of the elastic model: causality, routing, load balancing, training."""

import pytest
import torch

from models.config import MoEConfig
from models.losses import DistillationTarget, causal_lm_loss, distillation_loss
from models.moe import ElasticMoE, route_top_k
from models.subnet import SubnetSpec


def test_future_tokens_do_not_change_earlier_logits(tiny_config: MoEConfig) -> None:
    model = ElasticMoE(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 24))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, tiny_config.vocab_size, (2, 12))
    spec = SubnetSpec(layers=(1, 3), experts=((0, 1, 2), (3, 4, 5)), top_k=1)
    with torch.no_grad():
        for subnet in (None, spec):
            a, b = model(tokens, subnet=subnet).logits, model(changed, subnet=subnet).logits
            torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
            assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_sequence_longer_than_max_seq_len_is_rejected(tiny_config: MoEConfig) -> None:
    model = ElasticMoE(tiny_config)
    tokens = torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long)
    try:
        model(tokens)
    except ValueError as error:
        assert "exceeds max_seq_len=64" in str(error)
    else:
        raise AssertionError("expected a ValueError")


def test_router_bias_changes_selection_but_not_weights() -> None:
    hidden = torch.randn(10, 8)
    weight = torch.randn(4, 8)
    logits, w0, chosen0 = route_top_k(hidden, weight, torch.zeros(4), 2, 1e-12)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])  # forces expert 3 into every token's top-2
    _, w1, chosen1 = route_top_k(hidden, weight, bias, 2, 1e-12)
    assert (chosen1 == 3).any(dim=-1).all()
    probs = logits.softmax(-1)
    expected = probs.gather(-1, chosen1)
    torch.testing.assert_close(w1, expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(w0.sum(-1), torch.ones(10))


def test_routing_weights_do_not_depend_on_other_experts() -> None:
    """Why a sub-model with fewer experts is again exactly the ERNIE architecture."""
    hidden, weight = torch.randn(6, 8), torch.randn(5, 8)
    _, w_all, chosen = route_top_k(hidden, weight, torch.zeros(5), 2, 1e-12)
    kept = torch.unique(chosen)
    _, w_kept, chosen_kept = route_top_k(hidden, weight[kept], torch.zeros(len(kept)), 2, 1e-12)
    assert torch.equal(kept[chosen_kept], chosen)
    torch.testing.assert_close(w_kept, w_all)


def test_bias_update_moves_toward_balance(tiny_config: MoEConfig) -> None:
    config = tiny_config.model_copy(update={"load_balancing": "bias", "bias_update_rate": 0.01})
    model = ElasticMoE(config)
    with torch.no_grad():
        model.layers[1].mlp.gate.weight[0] += 1.0  # make expert 0 attractive
    tokens = torch.randint(0, config.vocab_size, (4, 32))
    out = model(tokens)
    stats = next(s for s in out.routing if s.layer == 1)
    assert torch.isclose(stats.expert_load.sum(), torch.tensor(1.0))
    before = model.layers[1].mlp.gate.e_score_correction_bias.clone()
    model.update_routing_bias(out.routing)
    after = model.layers[1].mlp.gate.e_score_correction_bias
    overloaded = stats.expert_load.argmax()
    underloaded = stats.expert_load.argmin()
    assert after[overloaded] == before[overloaded] - 0.01
    assert after[underloaded] == before[underloaded] + 0.01
    assert out.balancing_loss(config) == out.z_loss * config.z_loss_coef  # no aux loss in bias mode


def test_bias_update_is_one_step_however_many_forwards_a_step_accumulates(tiny_config: MoEConfig) -> None:
    """Four micro-batches of the full model and a sub-model's: still one update of at most the rate per layer, as
    DeepSeek-V3 makes one per step (each forward's stats used to add a whole step)."""
    config = tiny_config.model_copy(update={"load_balancing": "bias", "bias_update_rate": 0.01})
    model = ElasticMoE(config)
    with torch.no_grad():
        model.layers[1].mlp.gate.weight[0] += 1.0  # make expert 0 attractive
    tokens = torch.randint(0, config.vocab_size, (4, 32))
    full = [s for _ in range(4) for s in model(tokens).routing]
    small = model(tokens, subnet=SubnetSpec(layers=(1, 2), experts=((0, 1), (0, 1)), top_k=1)).routing
    before = model.layers[1].mlp.gate.e_score_correction_bias.clone()
    model.update_routing_bias([*full, *small])
    moved = model.layers[1].mlp.gate.e_score_correction_bias - before
    assert moved.abs().max() <= 0.01 + 1e-9
    assert moved[0] == -0.01  # over-loaded in the full model and in the sub-model that keeps it: both say lower


def test_subnet_routing_stats_cover_only_kept_experts(tiny_config: MoEConfig) -> None:
    model = ElasticMoE(tiny_config)
    spec = SubnetSpec(layers=(1, 2), experts=((1, 4), (0, 2, 3)), top_k=1)
    out = model(torch.randint(0, tiny_config.vocab_size, (2, 16)), subnet=spec)
    assert [s.layer for s in out.routing] == [1, 2]
    assert out.routing[0].kept.nonzero().flatten().tolist() == [1, 4]
    assert out.routing[0].expert_load[[0, 2, 3, 5]].sum() == 0
    assert out.aux_loss > 0 and out.z_loss > 0


def test_a_few_steps_reduce_the_loss_of_full_and_sub_model(tiny_config: MoEConfig) -> None:
    model = ElasticMoE(tiny_config)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a learnable toy language: the next token is the current one + 1
    starts = torch.randint(0, tiny_config.vocab_size, (8, 1))
    tokens = (starts + torch.arange(32)) % tiny_config.vocab_size
    spec = SubnetSpec(layers=(0, 2), experts=((), (0, 1, 2)), top_k=1)
    first = None
    for _ in range(60):
        full = model(tokens)
        sub = model(tokens, subnet=spec)
        loss = causal_lm_loss(full.logits, tokens) + causal_lm_loss(sub.logits, tokens)
        target = DistillationTarget.from_logits(full.logits, 1.0)
        loss = loss + distillation_loss(sub.logits, target) + full.balancing_loss(tiny_config)
        first = first if first is not None else loss.item()
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.5 * first


def test_distillation_loss_is_the_kl_divergence() -> None:
    student, teacher = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
    for t in (1.0, 2.0):
        target = DistillationTarget.from_logits(teacher, t)
        assert distillation_loss(teacher, target).abs() < 1e-6
        ours = distillation_loss(student, target)
        reference = torch.nn.functional.kl_div(
            torch.log_softmax(student.reshape(-1, 11) / t, -1),
            torch.log_softmax(teacher.reshape(-1, 11) / t, -1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        torch.testing.assert_close(ours, reference)
        grad_ours = torch.autograd.grad(ours, student)[0]
        grad_ref = torch.autograd.grad(reference, student)[0]
        torch.testing.assert_close(grad_ours, grad_ref)


def test_lm_loss_is_next_token_cross_entropy_by_hand() -> None:
    logits = torch.randn(2, 4, 7)
    tokens = torch.randint(0, 7, (2, 4))
    by_hand = -torch.stack(
        [torch.log_softmax(logits[b, t], -1)[tokens[b, t + 1]] for b in range(2) for t in range(3)]
    ).mean()
    torch.testing.assert_close(causal_lm_loss(logits, tokens), by_hand)


def test_dpo_loss_matches_a_hand_computed_case() -> None:
    from models.losses import dpo_loss

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-2.0, -5.0, -3.0, -4.0))
    # margin = (-2 - -3) - (-5 - -4) = 1 - (-1) = 2; beta 0.5 -> logits 1.0; loss = -log sigmoid(1) = 0.31326
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)  # -log sigmoid(-1)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1) ** 2)  # (margin - 1 / (2 * 0.5))^2
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")


def test_sequence_logprobs_sum_only_the_targets() -> None:
    from models.losses import IGNORE_INDEX, sequence_logprobs

    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    log_probs = torch.log_softmax(logits, -1)
    expected = torch.stack([log_probs[0, 0, 1] + log_probs[0, 2, 4], log_probs[1, 2, 0]])
    torch.testing.assert_close(sequence_logprobs(logits, targets), expected)
