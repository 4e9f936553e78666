"""The verifiable image tasks: reading a digit (exact match) and drawing one (the judge must read the drawing as the
digit asked for). Splits hold out by image and by phrasing; the checker, DPO's wrong answers and GRPO's reward all
go through the judge; SFT trains on both tasks."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tasks.align.config import GRPOConfig, SFTConfig
from tasks.align.grpo import answer_reward, run_grpo
from tasks.align.sft import run_sft
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.data.task_mix import (
    HELD_OUT_DRAW_REQUESTS,
    READ_QUESTION,
    Example,
    corpus_passages,
    corrupt,
    exact_match_by_task,
    fresh_examples,
    generate_splits,
)
from tasks.pipeline_config import load_pipeline_config
from tests.conftest import image_model

DIGIT_TASKS = TaskMixConfig(tasks=("copy", "digit_read", "digit_draw"), train_per_task=100, test_per_task=30)


@pytest.fixture(scope="module")
def passages(small_corpus: Path) -> list[str]:
    return corpus_passages("\n".join(p.read_text() for p in sorted(small_corpus.iterdir())))


@pytest.fixture(scope="module")
def splits(image_data: PreparedData, passages: list[str]) -> tuple[list[Example], list[Example]]:
    return generate_splits(DIGIT_TASKS, passages, image_data.images)


def drawing_of(image_data: PreparedData, split: str, index: int) -> tuple[str, int]:
    images = image_data.images
    assert images is not None
    digits = images.split(split)
    return images.image_tokenizer.text(images.image_tokenizer.encode(digits.pixels[index])), int(digits.labels[index])


def test_the_digit_splits_hold_out_by_image_and_by_phrasing(
    splits: tuple[list[Example], list[Example]], image_data: PreparedData, passages: list[str]
) -> None:
    train, test = splits
    assert generate_splits(DIGIT_TASKS, passages, image_data.images) == (train, test)  # seeded
    images = image_data.images
    assert images is not None
    encode = images.image_tokenizer.encode
    training_drawings = {images.image_tokenizer.text(encode(p)) for p in images.split("train").pixels}
    held_out_drawings = {images.image_tokenizer.text(encode(p)) for p in images.split("held_out").pixels}
    for example in train:
        if example.task == "digit_read":
            assert example.prompt.removesuffix(f" {READ_QUESTION}") in training_drawings
        if example.task == "digit_draw":
            assert example.answer in training_drawings  # SFT trains on real training drawings only
    reads = [e for e in test if e.task == "digit_read"]
    draws = [e for e in test if e.task == "digit_draw"]
    assert len(reads) == 30 and all(e.prompt.removesuffix(f" {READ_QUESTION}") in held_out_drawings for e in reads)
    requests = {r.format(digit=d) for r in HELD_OUT_DRAW_REQUESTS for d in range(10)}
    assert len(draws) == 20 and {e.prompt for e in draws} == requests  # each held-out phrasing once
    assert sum(e.task == "digit_draw" for e in train) == 100  # 30 phrasings, each with many drawings
    assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_a_drawing_passes_when_the_judge_reads_the_digit_asked_for(
    splits: tuple[list[Example], list[Example]], image_data: PreparedData
) -> None:
    _, test = splits
    request = next(e for e in test if e.task == "digit_draw")
    assert request.drawing is not None
    digit = request.drawing.digit
    images = image_data.images
    assert images is not None
    held_out = images.split("held_out")
    own = [drawing_of(image_data, "held_out", i)[0] for i, label in enumerate(held_out.labels) if label == digit][:10]
    other = [drawing_of(image_data, "held_out", i)[0] for i, label in enumerate(held_out.labels) if label != digit][:10]
    assert sum(request.check(text) for text in own) >= 9  # the judge reads >= 95% of reconstructions right
    assert sum(request.check(text) for text in other) <= 1  # drawings of other digits fail
    codes = own[0].removeprefix("<image>").removesuffix("</image>")
    assert not request.check(f"<image>{codes[: -len('<img_000>')]}</image>")  # 7 codes: no image
    assert not request.check("three") and request.similarity("three") == 0.0
    assert request.check(f"Here: {own[0]} done") == request.check(own[0])  # the first complete image counts
    assert 0.5 < request.similarity(own[0]) <= 1.0


def test_reading_is_exact_match_on_the_digit(image_data: PreparedData) -> None:
    text, label = drawing_of(image_data, "held_out", 0)
    read = Example("digit_read", f"{text} {READ_QUESTION}", str(label))
    assert read.check(f" {label}\n") and not read.check(str((label + 1) % 10))
    rng = random.Random(0)
    assert all(not read.check(corrupt(read, rng)) and corrupt(read, rng).isdigit() for _ in range(20))


def test_exact_match_by_task_scores_drawings_with_the_judge(splits: tuple[list[Example], list[Example]]) -> None:
    _, test = splits
    examples = [e for e in test if e.task in ("digit_read", "digit_draw")]
    right = {e.prompt: e.answer for e in examples}
    assert exact_match_by_task(examples, lambda prompt: "no") == {"digit_read": 0.0, "digit_draw": 0.0, "overall": 0.0}
    perfect = exact_match_by_task(examples, right.__getitem__)
    assert perfect["digit_read"] == 1.0 and perfect["digit_draw"] >= 0.9  # a real drawing the judge misreads fails


def test_dpo_s_wrong_drawings_and_grpo_s_reward_come_from_the_judge(
    splits: tuple[list[Example], list[Example]],
) -> None:
    train, _ = splits
    rng = random.Random(0)
    draws = [e for e in train if e.task == "digit_draw" and e.check(e.answer)][:20]
    wrong = [corrupt(e, rng) for e in draws]
    assert sum(not e.check(w) for e, w in zip(draws, wrong, strict=True)) >= 18  # drawings of other digits
    config = GRPOConfig(partial_credit=0.5, format_reward=0.0)
    example = draws[0]
    assert answer_reward(example.answer, example, True, True, config) == 1.0
    assert example.drawing is not None
    partial = answer_reward(wrong[0], example, True, False, config)
    assert partial == pytest.approx(0.5 * example.drawing.probability(wrong[0])) and partial < 0.25


def test_fresh_prompts_for_grpo_draw_new_drawings_and_unseen_images(
    splits: tuple[list[Example], list[Example]], image_data: PreparedData, passages: list[str]
) -> None:
    train, test = splits
    fresh = fresh_examples(DIGIT_TASKS, passages, 20, [train, test], image_data.images)
    reads = [e for e in fresh if e.task == "digit_read"]
    assert len(reads) == 20 and not {e.prompt for e in reads} & {e.prompt for e in train + test}
    assert sum(e.task == "digit_draw" for e in fresh) == 20


def test_sft_trains_on_reading_and_drawing(image_data: PreparedData, splits) -> None:
    train, test = splits
    model = image_model().train()
    config = SFTConfig(
        task_mix=DIGIT_TASKS, steps=5, batch_size=8, replay={"batch_size": 2}, max_new_tokens=11, optim={"lr": 1e-3}
    )
    result = run_sft(config, model, image_data.chat_tokenizer(), train, test[:6], (), image_data.training_mix())
    assert len(result.losses) == 5 and all(torch.isfinite(torch.tensor(result.losses)))


def test_grpo_on_drawing_requests_is_rewarded_by_the_judge(image_data: PreparedData, splits) -> None:
    """Unified multimodal RL in miniature: once a short SFT has taught the shape of a drawing reply, GRPO's rewards
    are the judge's verdicts on sampled drawings, and they differ within a group: a signal the policy moves on."""
    train, test = splits
    draws, held_out = [e for e in train if e.task == "digit_draw"], [e for e in test if e.task == "digit_draw"][:4]
    tokenizer, model = image_data.chat_tokenizer(), image_model().train()
    shape = SFTConfig(
        task_mix=DIGIT_TASKS, steps=60, batch_size=16, replay={"batch_size": 0}, max_new_tokens=11, optim={"lr": 1e-2}
    )
    run_sft(shape, model, tokenizer, draws, [])
    start = copy.deepcopy(model)
    config = GRPOConfig(
        enabled=True, steps=3, prompts_per_step=4, group_size=6, max_new_tokens=11, partial_credit=0.5,
        replay={"batch_size": 0}, optim={"lr": 1e-3},
    )  # fmt: skip
    result = run_grpo(config, model, tokenizer, draws, held_out)
    assert all(m["response_length"] <= 11 for m in result.metrics)
    assert any(m["useful_groups"] > 0 and m["reward_std"] > 0 for m in result.metrics)
    assert "digit_draw" in result.accuracy_after
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters(), strict=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sft.task_mix.tasks": ["copy", "digit_draw"]}, "digit_draw need data.images"),
        ({"search.image_loss_weight": 0.5}, "search.image_loss_weight=0.5 needs data.images"),
        (
            {"data.vocab_size": 1154, "pretrain.model.vocab_size": 1154, "data.images": {}, "sft.max_new_tokens": 8,
             "sft.task_mix.tasks": ["digit_draw"]},
            "sft.max_new_tokens=8: digit_draw's answers take 11 tokens; allowed: >= 11",
        ),
    ],
)  # fmt: skip
def test_digit_tasks_need_images_and_room_for_a_drawing(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_pipeline_config("tiny", overrides)
