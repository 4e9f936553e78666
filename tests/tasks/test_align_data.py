"""Alignment data: seeded task splits, checkers, corruptions, user jsonl."""

import json
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.data.config import TaskMixConfig
from tasks.data.task_mix import (
    Conversation,
    Example,
    as_conversation,
    corpus_passages,
    corrupt,
    fresh_examples,
    generate_splits,
    read_preference_jsonl,
    read_sft_jsonl,
)


@pytest.fixture(scope="module")
def passages(small_corpus: Path) -> list[str]:
    return corpus_passages("\n".join(p.read_text() for p in sorted(small_corpus.iterdir())))


def test_splits_are_seeded_disjoint_and_checkable(passages: list[str]) -> None:
    config = TaskMixConfig(train_per_task=60, test_per_task=20)
    train, test = generate_splits(config, passages)
    again, _ = generate_splits(config, passages)
    assert train == again
    assert len(train) == 5 * 60 and len(test) == 5 * 20
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    by_task = {e.task: e for e in test}
    assert set(by_task) == {"arithmetic", "copy", "reverse", "sort", "span"}
    for example in train + test:
        assert example.check(example.answer) and example.check(f" {example.answer}\n")
    arithmetic = next(e for e in train if e.task == "arithmetic")
    a, op, b = arithmetic.prompt.removeprefix("What is ").removesuffix("?").split()
    assert int(arithmetic.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    span = by_task["span"]
    words = span.prompt.split("\n")[0].removeprefix("Passage: ").split()
    cue = span.prompt.split("'")[1]
    assert words[words.index(cue) + 1] == span.answer


def test_fresh_examples_avoid_both_splits(passages: list[str]) -> None:
    config = TaskMixConfig(train_per_task=60, test_per_task=20)
    train, test = generate_splits(config, passages)
    fresh = fresh_examples(config, passages, 30, [train, test])
    assert fresh == fresh_examples(config, passages, 30, [train, test])
    assert len(fresh) == 5 * 30 and {e.task for e in fresh} == set(config.tasks)
    assert not {e.prompt for e in fresh} & {e.prompt for e in train + test}


def test_corruptions_are_always_wrong(passages: list[str]) -> None:
    train, _ = generate_splits(TaskMixConfig(train_per_task=40, test_per_task=5), passages)
    rng = random.Random(0)
    for example in train:
        assert not example.check(corrupt(example, rng)), example


def test_conversations_must_end_with_the_assistant() -> None:
    assert as_conversation(Example("copy", "Repeat: a", "a")).messages[-1].role == "assistant"
    with pytest.raises(ValidationError, match="the last message must be the assistant's"):
        Conversation(messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])


def test_user_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n{oops\n"
    )
    with pytest.raises(ValueError, match=r"2 malformed line\(s\)") as error:
        read_sft_jsonl(sft)
    assert "sft.jsonl:2: messages.0.role" in str(error.value) and "sft.jsonl:3:" in str(error.value)
    sft.write_text(json.dumps(good) + "\n")
    assert read_sft_jsonl(sft)[0].messages[1].content == "hello"
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n" + json.dumps({"prompt": "x"})
    )
    with pytest.raises(ValueError, match="prefs.jsonl:2: chosen: Field required"):
        read_preference_jsonl(prefs)
    with pytest.raises(ValueError, match="does not exist"):
        read_preference_jsonl(tmp_path / "missing.jsonl")
