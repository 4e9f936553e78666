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


def test_the_code_defaults_are_the_tiny_preset_and_stage_configs_agree() -> None:
    """One source of defaults: a section built on its own (`SFTConfig()`, as a test or a script does) is the one the
    pipeline runs with no preset, and tiny.yaml sets nothing."""
    from tasks.align.config import DPOConfig, SFTConfig
    from tasks.pipeline_config import CONFIG_DIR

    default = PipelineConfig()
    assert load_pipeline_config("tiny") == default
    assert yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text()) == {}
    assert SFTConfig() == default.sft and DPOConfig() == default.dpo
    assert default.sft.replay.batch_size == 4 and default.sft.optim.weight_decay == 0.0


@pytest.mark.parametrize(
    ("override", "moved"),
    [
        ({"sft": {"lr": 1e-3}}, "sft.lr is now sft.optim.lr"),
        ({"sft": {"replay_batch_size": 2}}, "sft.replay_batch_size is now sft.replay.batch_size"),
        ({"grpo": {"replay_len": 64}}, "grpo.replay_len is now grpo.replay.seq_len"),
        ({"extract": {"warmup_steps": 3}}, "extract.warmup_steps is now extract.optim.warmup_steps"),
    ],
)
def test_a_moved_key_is_refused_naming_its_new_place(override: dict, moved: str) -> None:
    with pytest.raises(ValidationError, match=moved.replace(".", r"\.")):
        PipelineConfig.model_validate(override)


def test_a_stage_optimiser_key_left_unset_keeps_the_stages_default() -> None:
    """SFT's `optim: {lr: ...}` keeps fine-tuning's AdamW (no weight decay, beta2 0.999), not pre-training's."""
    config = PipelineConfig.model_validate({"sft": {"optim": {"lr": 1e-4}}, "dpo": {"optim": {"warmup_steps": 2}}})
    assert (config.sft.optim.lr, config.sft.optim.weight_decay, config.sft.optim.beta2) == (1e-4, 0.0, 0.999)
    assert (config.dpo.optim.lr, config.dpo.optim.min_lr_ratio) == (5e-5, 1.0)  # DPO: constant after warm-up
    assert config.pretrain.optim.weight_decay == 0.1


@pytest.mark.slow
def test_an_installed_wheel_finds_every_preset(tmp_path: Path) -> None:
    """The presets ship as package data: `--config small` works from a wheel, outside any checkout."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"  # built from a copy: setuptools leaves a build/ folder beside what it builds
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "wheel"), str(source)], check=True, timeout=600)
    wheel = next((tmp_path / "wheel").glob("trainonce-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=600)
    probe = (
        "from tasks.pipeline_config import CONFIG_DIR, load_pipeline_config; "
        "print(CONFIG_DIR); print(load_pipeline_config('small').pretrain.model.d_model)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    where, d_model = done.stdout.split()
    assert where == str(target / "configs") and d_model == "512"
