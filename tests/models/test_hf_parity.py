"""Our model is exactly transformers' Ernie4_5_MoeForCausalLM (built offline from a config: no download)."""

import pytest
import torch
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

from models.config import MoEConfig
from models.extract import extract_subnet
from models.hf import config_from_hf, from_hf_state_dict, hf_config_dict, to_hf_state_dict
from models.moe import ElasticMoE
from models.subnet import SubnetSpec

HF_KWARGS = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_num_experts=8,
    moe_k=2,
    moe_num_shared_experts=1,
    moe_intermediate_size=32,
    moe_layer_start_index=1,
    rms_norm_eps=1e-5,
)


def _random_hf_model(**overrides) -> Ernie4_5_MoeForCausalLM:
    torch.manual_seed(0)
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**{**HF_KWARGS, **overrides})).eval()
    with torch.no_grad():  # trained ERNIE checkpoints have non-zero selection biases and non-unit norms
        for name, param in model.named_parameters():
            if "e_score_correction_bias" in name:
                param.normal_(0.0, 0.05)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
    return model


def _max_diff(hf: Ernie4_5_MoeForCausalLM, ours: ElasticMoE, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens).logits).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tied embeddings, one dense layer, shared expert
        {"tie_word_embeddings": False, "moe_num_shared_experts": 0, "moe_layer_start_index": 0},
        {"head_dim": 24, "num_key_value_heads": 4, "moe_k": 3},
    ],
)
def test_logits_match_transformers(overrides: dict) -> None:
    hf = _random_hf_model(**overrides)
    ours = from_hf_state_dict(hf.config.to_dict(), hf.state_dict()).eval()
    tokens = torch.randint(0, 512, (2, 33))
    diff = _max_diff(hf, ours, tokens)
    assert diff <= 1e-5, diff
    with torch.no_grad():
        assert hf(tokens).logits.std() > 0.1  # a meaningful comparison, not of two constant outputs


def test_our_model_leaves_as_an_hf_model_and_so_does_an_extracted_sub_model(tiny_supernet: ElasticMoE) -> None:
    spec = SubnetSpec(layers=(0, 2, 3), experts=((), (0, 3, 4, 5), (1, 2, 4, 5)), top_k=1)
    tokens = torch.randint(0, tiny_supernet.config.vocab_size, (2, 20))
    for model in (tiny_supernet, extract_subnet(tiny_supernet, spec).eval()):
        hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_dict(model.config))).eval()
        result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
        assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to embeddings
        assert _max_diff(hf, model, tokens) <= 1e-5


def test_hf_config_round_trips() -> None:
    config = MoEConfig(first_dense_layers=1, tie_embeddings=False, head_dim=32)
    assert config_from_hf({"model_type": "ernie4_5_moe", **config.to_hf_dict()}) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "qwen3_moe"}, "model_type: expected 'ernie4_5_moe'"),
        ({"moe_layer_interval": 2}, "moe_layer_interval: only 1 is supported, got 2"),
        ({"use_bias": True}, "use_bias"),
    ],
)
def test_unsupported_hf_configs_are_named(overrides: dict, message: str) -> None:
    hf = {"model_type": "ernie4_5_moe", **MoEConfig().to_hf_dict(), **overrides}
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf)
