"""safetensors + config.json round trip, with shapes validated on load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import WEIGHTS_FILE, load_model, save_model
from models.config import MoEConfig
from models.moe import ElasticMoE
from models.subnet import Importance


def test_round_trip_keeps_outputs_and_importance(tmp_path, tiny_config: MoEConfig) -> None:
    model = ElasticMoE(tiny_config).eval()
    importance = Importance(
        layer_order=(1, 3, 0, 2), expert_order=((), (5, 4, 3, 2, 1, 0), (0, 1, 2, 3, 4, 5), (2, 0, 1, 3, 4, 5))
    )
    model.set_importance(importance)
    with torch.no_grad():
        model.layers[2].mlp.gate.e_score_correction_bias.fill_(0.25)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert loaded.importance() == importance
    assert loaded.config == tiny_config
    assert loaded.layers[2].mlp.gate.e_score_correction_bias[0] == 0.25


def test_shape_mismatch_is_reported_before_loading(tmp_path, tiny_config: MoEConfig) -> None:
    save_model(ElasticMoE(tiny_config), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["expert_ffn_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers.1.mlp.experts.down_proj: shape \(6, 32, 16\) but the config"):
        load_model(tmp_path)


def test_missing_tensor_is_reported(tmp_path, tiny_config: MoEConfig) -> None:
    save_model(ElasticMoE(tiny_config), tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    del state["norm.weight"]
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing norm.weight"):
        load_model(tmp_path)


def test_missing_files_are_reported(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
