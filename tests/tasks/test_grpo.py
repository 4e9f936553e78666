"""The GRPO stage on the small chat model: a reward that is always equal moves nothing; the curriculum favours
tasks whose groups disagree."""

import copy

import pytest
import torch

from models.moe import ElasticMoE
from tasks.align.config import GRPOConfig
from tasks.align.grpo import TaskCurriculum, answer_reward, run_grpo
from tasks.data.corpus import PreparedData
from tasks.data.task_mix import Example


@pytest.mark.parametrize("dynamic_sampling", [0, 3])
def test_equal_rewards_produce_no_update(
    chat_model: ElasticMoE, small_data: PreparedData, dynamic_sampling: int
) -> None:
    """Also with dynamic sampling, which draws new prompts for groups that all agree, up to 3 x 2 groups a step."""
    model = copy.deepcopy(chat_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impossible = [Example("copy", f"Copy: king {i}", "\x00 no model writes this") for i in range(4)]
    config = GRPOConfig(
        enabled=True, steps=2, prompts_per_step=2, group_size=3, max_new_tokens=4, replay={"batch_size": 0}, pass_k=2,
        dynamic_sampling=dynamic_sampling, optim={"warmup_steps": 0, "min_lr_ratio": 0.0},
    )  # fmt: skip
    result = run_grpo(config, model, small_data.chat_tokenizer(), impossible, impossible[:2])
    assert [m["reward_mean"] for m in result.metrics] == [0.0, 0.0]
    assert [m["useful_groups"] for m in result.metrics] == [0.0, 0.0]
    assert [m["zero_variance_groups"] for m in result.metrics] == [1.0, 1.0]
    assert [m["groups_drawn"] for m in result.metrics] == [6.0, 6.0] if dynamic_sampling else [2.0, 2.0]
    assert [m["lr"] for m in result.metrics] == pytest.approx(
        [config.optim.lr, config.optim.lr / 2]
    )  # cosine: halfway at 1/2
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_rewards_exact_then_partial_credit_then_format() -> None:
    config = GRPOConfig(partial_credit=0.5, format_reward=0.1)
    copy = Example("copy", "Repeat: king queen crown", "king queen crown")
    assert answer_reward("king queen crown", copy, True, True, config) == 1.1
    # difflib's ratio on words: 2 * 2 matching / (2 + 3) words = 0.8, at half weight, plus the format reward
    assert answer_reward("king queen", copy, True, False, config) == pytest.approx(0.5)
    assert answer_reward("king queen", copy, False, False, config) == 0.0  # cut off: nothing
    sum_ = Example("arithmetic", "What is 20 + 22?", "42")
    assert answer_reward("41", sum_, True, False, GRPOConfig()) == 0.0  # the default: exact answers only


def test_the_curriculum_favours_tasks_whose_groups_disagree() -> None:
    curriculum = TaskCurriculum(["copy", "sort", "span"])
    for _ in range(20):
        curriculum.update("copy", 1.0)  # always solved
        curriculum.update("span", 0.0)  # never solved
        curriculum.update("sort", 0.5)
    copy_weight, sort_weight, span_weight = curriculum.weights()
    assert sort_weight > 4 * copy_weight and sort_weight > 4 * span_weight
    assert min(copy_weight, span_weight) > 0  # still drawn now and then


def test_the_align_stage_registers_grpo_after_dpo_and_deploys_it(
    chat_model: ElasticMoE, small_data: PreparedData, tmp_path
) -> None:
    from models.checkpoint import save_model
    from registry.tracking import store_client
    from tasks.align.config import DPOConfig, SFTConfig
    from tasks.align.task import dpo_task, grpo_task, sft_task
    from tasks.common.stage_results import AlignedModels
    from tasks.data.config import TaskMixConfig

    mix = TaskMixConfig(tasks=("copy",), train_per_task=8, test_per_task=2)
    sft = SFTConfig(task_mix=mix, steps=2, batch_size=4, max_new_tokens=4, replay={"batch_size": 0})
    dpo = DPOConfig(steps=1, batch_size=2, max_new_tokens=4, max_pairs=4)
    grpo = GRPOConfig(enabled=True, steps=2, prompts_per_step=1, group_size=2, max_new_tokens=4, pass_k=2)
    subnet = save_model(copy.deepcopy(chat_model), tmp_path / "subnet")
    data_dir, workdir = str(small_data.directory), str(tmp_path / "work")
    sft_step = sft_task.fn(sft, str(subnet), data_dir, workdir, "1")
    dpo_step = dpo_task.fn(dpo, mix, sft_step, data_dir, workdir, "1")
    grpo_step = grpo_task.fn(grpo, mix, dpo_step, data_dir, workdir, "1")
    aligned = AlignedModels.of("trainonce-subnet/1", sft_step, dpo_step, grpo_step)
    assert aligned.grpo_uri is not None and aligned.final_uri == aligned.grpo_uri
    assert set(aligned.accuracy) == {"base", "sft", "dpo", "grpo"}
    client = store_client(tmp_path / "work")
    (run,) = client.search_runs([client.get_experiment_by_name("trainonce").experiment_id], "tags.stage = 'grpo'")
    assert {"held_out/exact_match/overall", "held_out/pass_at_k", "train/reward_mean"} <= set(run.data.metrics)
    assert any(a.path.endswith("grpo.png") for a in client.list_artifacts(run.info.run_id))
    version = client.get_model_version("trainonce-chat-torch", aligned.grpo_uri.rsplit("/", 1)[-1])
    assert version.tags["stage"] == "grpo" and version.tags["parent_dpo_version"] == dpo_step.version
