"""The pipeline flow's parameters are the pydantic config: Prefect validates them before a run exists."""

import pytest
from prefect.exceptions import ParameterTypeError

from flows.pipeline import pipeline
from tasks.pipeline_config import PipelineConfig, load_pipeline_config


def test_valid_preset_passes_prefect_parameter_validation() -> None:
    config = load_pipeline_config("tiny")
    validated = pipeline.validate_parameters({"config": config.model_dump(mode="json"), "workdir": "runs/x"})
    assert isinstance(validated["config"], PipelineConfig)
    assert validated["config"] == config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("pretrain", "model", "top_k"), 99, "top_k=99 must be <="),
        (("pretrain", "optim", "lr"), -1.0, "greater than 0"),
        (("data", "vocab_size"), 10, "greater than or equal to 300"),
    ],
)
def test_bad_values_are_rejected_before_a_run(path: tuple[str, ...], value: object, message: str) -> None:
    raw = load_pipeline_config("tiny").model_dump(mode="json")
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParameterTypeError, match=message):
        pipeline.validate_parameters({"config": raw})


def test_parameter_schema_carries_descriptions_for_the_ui() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(pipeline.fn).model_dump()
    definitions = schema["definitions"]
    assert schema["properties"]["config"]["$ref"].endswith("PipelineConfig")
    assert definitions["MoEConfig"]["properties"]["top_k"]["description"].startswith("Experts each token")
    assert definitions["SamplingConfig"]["properties"]["policy"]["enum"] == ["full", "random", "sandwich"]
