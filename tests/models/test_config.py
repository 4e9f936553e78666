"""Bad model configs are rejected before any compute, with messages naming the field."""

import pytest
from pydantic import ValidationError

from models.config import MoEConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_experts": 4, "top_k": 5}, "top_k=5 must be <= the experts of layer 0 (4)"),
        ({"d_model": 30, "n_heads": 4}, "n_heads=4 must divide d_model=30"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3 must divide n_heads=4"),
        ({"head_dim": 15}, "must be even"),
        ({"n_layers": 2, "first_dense_layers": 3}, "first_dense_layers=3 must be <= n_layers=2"),
        ({"n_layers": 2, "layer_n_experts": (4,)}, "layer_n_experts has 1 entries"),
        ({"expert_impl": "grouped_mm", "expert_ffn_dim": 20}, "multiples of 8"),
        ({"top_k": 0}, "top_k"),
        ({"vocab_size": 3}, "vocab_size"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        MoEConfig(**overrides)
    assert message in str(error.value)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="n_expert"):
        MoEConfig(n_expert=4)


def test_range_error_states_the_bound() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        MoEConfig(n_layers=0)


def test_non_uniform_experts_cannot_leave_as_ernie() -> None:
    config = MoEConfig(n_layers=3, layer_n_experts=(8, 8, 4))
    assert not config.uniform_experts
    with pytest.raises(ValueError, match="layer 2 has 4 experts but layer 0 has 8"):
        config.to_hf_dict()
