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
