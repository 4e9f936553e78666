"""The GRPO stage on the small chat model: a reward that is always equal moves nothing; the curriculum favours
tasks whose groups disagree."""

import copy

import torch

from models.moe import ElasticMoE
from tasks.align_data import Example
from tasks.data import PreparedData
from tasks.grpo import GRPOConfig, TaskCurriculum, run_grpo


def test_equal_rewards_produce_no_update(chat_model: ElasticMoE, small_data: PreparedData) -> None:
    model = copy.deepcopy(chat_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impossible = [Example("copy", f"Copy: king {i}", "\x00 no model writes this") for i in range(4)]
    config = GRPOConfig(
        enabled=True, steps=2, prompts_per_step=2, group_size=3, max_new_tokens=4, replay_batch_size=0, pass_k=2
    )
    result = run_grpo(config, model, small_data.chat_tokenizer(), impossible, impossible[:2])
    assert [m["reward_mean"] for m in result.metrics] == [0.0, 0.0]
    assert [m["useful_groups"] for m in result.metrics] == [0.0, 0.0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_curriculum_favours_tasks_whose_groups_disagree() -> None:
    curriculum = TaskCurriculum(["copy", "sort", "span"])
    for _ in range(20):
        curriculum.update("copy", 1.0)  # always solved
        curriculum.update("span", 0.0)  # never solved
        curriculum.update("sort", 0.5)
    copy_weight, sort_weight, span_weight = curriculum.weights()
    assert sort_weight > 4 * copy_weight and sort_weight > 4 * span_weight
    assert min(copy_weight, span_weight) > 0  # still drawn now and then
