"""Importance: routing mass orders experts, block influence orders layers."""

import copy

import pytest
import torch

from models.importance import ImportanceScores, measure_importance
from models.moe import ElasticMoE


def test_scores_follow_what_the_model_does(tiny_supernet: ElasticMoE) -> None:
    model = copy.deepcopy(tiny_supernet)
    with torch.no_grad():
        model.layers[2].mlp.gate.weight[4] *= 30.0  # expert 4 of layer 2 now wins most routing mass
        model.layers[3].self_attn.o_proj.weight.zero_()  # layer 3 changes its input least:
        model.layers[3].mlp.experts.down_proj.zero_()  # its attention and experts add nothing
        model.layers[3].mlp.shared_experts.down_proj.weight.zero_()
    batches = [torch.randint(0, model.config.vocab_size, (2, 32)) for _ in range(3)]
    scores = measure_importance(model, batches)
    assert scores.expert_mass[0] == ()  # layer 0 is dense
    assert all(sum(m) == pytest.approx(1.0, abs=1e-4) for m in scores.expert_mass[1:])
    assert scores.layer_influence[3] == pytest.approx(0.0, abs=1e-5)
    importance = scores.importance()
    assert importance.expert_order[2][0] == 4
    assert importance.layer_order[-1] == 3
    model.set_importance(importance)
    assert model.importance() == importance


def test_orders_break_ties_by_index() -> None:
    scores = ImportanceScores(layer_influence=(0.1, 0.3, 0.1), expert_mass=((), (0.5, 0.5), (0.2, 0.8)))
    importance = scores.importance()
    assert importance.layer_order == (1, 0, 2)
    assert importance.expert_order == ((), (0, 1), (1, 0))


def test_no_calibration_data_is_an_error(tiny_supernet: ElasticMoE) -> None:
    with pytest.raises(ValueError, match="no calibration tokens"):
        measure_importance(tiny_supernet, [])


def test_reap_ranks_a_busy_expert_that_adds_nothing_last(tiny_supernet: ElasticMoE) -> None:
    model = copy.deepcopy(tiny_supernet)
    with torch.no_grad():
        model.layers[2].mlp.gate.weight[4] *= 30.0  # expert 4 wins the routing ...
        model.layers[2].mlp.experts.down_proj[4].zero_()  # ... but its output is zero
    batches = [torch.randint(0, model.config.vocab_size, (2, 32)) for _ in range(3)]
    mass = measure_importance(model, batches, "routing_mass").importance()
    reap = measure_importance(model, batches, "reap")
    assert mass.expert_order[2][0] == 4
    assert reap.expert_mass[2][4] == 0.0 and reap.importance().expert_order[2][-1] == 4
    assert reap.expert_mass[0] == () and all(s >= 0 for s in reap.expert_mass[1])


def test_reap_score_is_gate_weight_times_output_norm_over_routed_tokens(tiny_supernet: ElasticMoE) -> None:
    from models.importance import reap_saliency
    from models.moe import route_top_k, swiglu

    block = tiny_supernet.layers[1].mlp
    hidden = torch.randn(20, tiny_supernet.config.d_model)
    total, count = reap_saliency(block, hidden)
    bias = block.gate.e_score_correction_bias
    _, weights, chosen = route_top_k(hidden, block.gate.weight, bias, block.top_k, block.norm_min)
    for expert in range(block.n_experts):
        expected = sum(
            float(weights[t, s])
            * float(
                swiglu(hidden[t : t + 1], block.experts.gate_up_proj[expert], block.experts.down_proj[expert]).norm()
            )
            for t in range(20)
            for s in range(2)
            if chosen[t, s] == expert
        )
        assert float(total[expert]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert int(count[expert]) == int((chosen == expert).sum())
