"""Config files and deployment parameters are changes over a base preset, field by field; family members are
checked like the main search."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tasks.pipeline_config import PipelineConfig, load_pipeline_config


def test_a_section_that_sets_one_field_keeps_the_presets_other_fields(tmp_path: Path) -> None:
    """A user's file with `sft: {steps: 10}` used to get replay.batch_size=0 (the code default, which the README
    says destroys language modelling in SFT) instead of the preset's 4."""
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"sft": {"steps": 10}}))
    config, tiny = load_pipeline_config(user), load_pipeline_config("tiny")
    assert config.sft.steps == 10
    assert config.sft.replay.batch_size == tiny.sft.replay.batch_size == 4
    assert config.sft.task_mix == tiny.sft.task_mix


def test_deployment_parameters_merge_the_same_way() -> None:
    """Prefect validates a deployment run's `config` parameter with PipelineConfig: the same merge applies."""
    config = PipelineConfig.model_validate({"sft": {"steps": 10}, "pretrain": {"optim": {"lr": 1e-3}}})
    tiny = load_pipeline_config("tiny")
    assert (config.sft.steps, config.sft.replay.batch_size) == (10, tiny.sft.replay.batch_size)
    assert config.pretrain.optim.lr == 1e-3
    assert config.pretrain.optim.warmup_steps == tiny.pretrain.optim.warmup_steps
    assert config.pretrain.model == tiny.pretrain.model


def test_a_file_can_name_its_base_preset(tmp_path: Path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"base": "small", "dpo": {"steps": 7}}))
    config, small = load_pipeline_config(user), load_pipeline_config("small")
    assert config.dpo.steps == 7
    assert config.dpo.batch_size == small.dpo.batch_size
    assert config.pretrain == small.pretrain
    assert small.sft.replay.batch_size == 8  # the small preset's SFT keeps replay (it was 0 before the merge)


def test_bad_files_are_refused_naming_the_problem(tmp_path: Path) -> None:
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text(f"base: {loop_b}\n")
    loop_b.write_text(f"base: {loop_a}\n")
    with pytest.raises(ValueError, match="base: presets form a cycle"):
        load_pipeline_config(loop_a)
    listed = tmp_path / "list.yaml"
    listed.write_text("- sft\n")
    with pytest.raises(ValueError, match="a config file is a mapping of sections, got list"):
        load_pipeline_config(listed)


def test_family_members_get_their_own_search_and_registered_model() -> None:
    config = load_pipeline_config("tiny", {"family": [{"name": "small", "active_params_fraction": 0.5}]})
    (member,) = config.family
    search = member.search(config.search)
    assert search.active_params_fraction == 0.5 and search.total_params_fraction is None
    assert search.max_evaluations == config.search.max_evaluations  # the rest of the main search's settings
    assert member.model_name() == "trainonce-chat-small"


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ([{"name": "Small", "active_params_fraction": 0.5}], "family.0.name"),
        ([{"name": "small"}], "give at least one budget"),
        (
            [{"name": "s", "active_params_fraction": 0.5}, {"name": "s", "total_params_fraction": 0.5}],
            "every member needs its own name",
        ),
        ([{"name": "tiny", "active_params_fraction": 0.01}], r"family\[tiny\]: active_params budget .* infeasible"),
    ],
)
def test_bad_family_members_are_refused_before_any_compute(family: list[dict], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_pipeline_config("tiny", {"family": family})
