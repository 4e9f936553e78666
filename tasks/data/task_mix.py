"""Alignment data: instruction tasks with checkable answers, preference pairs, user files.

Every generated example comes from a seed, so train and held-out splits are reproducible and disjoint; every
task has a checker, so accuracy is exact match on what the model generated, not a judge's opinion.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.chat_format import Message
from tasks.data.config import TaskMixConfig


class Conversation(BaseModel):
    """One SFT example: `{"messages": [...]}`, ending with the assistant's reply that is trained on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: tuple[Message, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _ends_with_assistant(self) -> Conversation:
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's")
        return self


class PreferencePair(BaseModel):
    """One DPO example: `{"prompt", "chosen", "rejected"}` (the prompt is the user's turn)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    chosen: str
    rejected: str
    rejected_source: Literal["on_policy", "corrupted", "user"] = "user"


# ---------------------------------------------------------------------------------------------------------
# Tasks with verifiable answers


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


WORDS = (
    "king",
    "queen",
    "lord",
    "lady",
    "fool",
    "ghost",
    "sword",
    "crown",
    "rose",
    "night",
    "day",
    "love",
    "death",
    "storm",
    "sea",
    "fire",
    "moon",
    "star",
    "heart",
    "blood",
    "honour",
    "grace",
)


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return Example("arithmetic", f"What is {a} + {b}?", str(a + b))
    a, b = max(a, b), min(a, b)
    return Example("arithmetic", f"What is {a} - {b}?", str(a - b))


def _copy(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Example("copy", f"Repeat: {' '.join(words)}", " ".join(words))


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Example("reverse", f"Reverse: {' '.join(words)}", " ".join(reversed(words)))


def _sort(rng: random.Random) -> Example:
    numbers = rng.sample(range(10, 100), rng.randint(3, 5))
    return Example("sort", f"Sort: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers))))


def _span(passages: Sequence[str]) -> Callable[[random.Random], Example]:
    """Questions answered by a span of a corpus passage: the word that follows a given word."""

    def make(rng: random.Random) -> Example:
        for _ in range(1000):
            words = rng.choice(passages).split()
            i = rng.randrange(len(words) - 1)
            # the cue must occur once, so the answer is unambiguous
            if words.count(words[i]) == 1:
                passage = " ".join(words)
                return Example("span", f"Passage: {passage}\nWhich word follows '{words[i]}'?", words[i + 1])
        raise ValueError("passages: no word occurs exactly once, so no span question is unambiguous")

    return make


def check(answer: str, expected: str) -> bool:
    """Exact match after trimming whitespace: every task's answer is a short canonical string."""
    return answer.strip() == expected.strip()


def exact_match_by_task(examples: Sequence[Example], reply: Callable[[str], str]) -> dict[str, float]:
    """Held-out accuracy per task (and `overall`) of the replies `reply(prompt)` gives; one scorer for every
    runtime (PyTorch during alignment, onnxruntime for deployables), so their numbers compare."""
    hits: dict[str, list[bool]] = {}
    for example in examples:
        hits.setdefault(example.task, []).append(check(reply(example.prompt), example.answer))
    accuracy = {task: sum(h) / len(h) for task, h in hits.items()}
    accuracy["overall"] = sum(sum(h) for h in hits.values()) / max(1, sum(len(h) for h in hits.values()))
    return accuracy


def corpus_passages(text: str, n_words: int = 12, limit: int = 2000) -> list[str]:
    """Short passages (consecutive words of single lines) cut from the corpus for span questions."""
    passages = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= n_words:
            passages.append(" ".join(words[:n_words]))
        if len(passages) >= limit:
            break
    if not passages:
        raise ValueError(f"the corpus has no line of {n_words} words to cut span passages from")
    return passages


def _draw(config: TaskMixConfig, passages: Sequence[str], seed: int, per_task: int, exclude: set[str]) -> list[Example]:
    """`per_task` distinct examples of each task from `seed`, none whose prompt is in `exclude`."""
    makers = {"arithmetic": _arithmetic, "copy": _copy, "reverse": _reverse, "sort": _sort, "span": _span(passages)}
    rng, examples = random.Random(seed), []
    for name in config.tasks:
        seen: set[str] = set()
        for _ in range(per_task * 50):
            if len(seen) == per_task:
                break
            example = makers[name](rng)
            if example.prompt not in exclude and example.prompt not in seen:
                seen.add(example.prompt)
                examples.append(example)
    return examples


def generate_splits(config: TaskMixConfig, passages: Sequence[str]) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; a held-out prompt never appears in train."""
    train = _draw(config, passages, config.seed, config.train_per_task, set())
    test = _draw(config, passages, config.seed + 1, config.test_per_task, {e.prompt for e in train})
    return train, test


def fresh_examples(
    config: TaskMixConfig, passages: Sequence[str], per_task: int, splits: Sequence[Sequence[Example]]
) -> list[Example]:
    """Examples of the same tasks whose prompts are in none of `splits` (drawn from seed + 2).

    Reinforcement learning needs them: after SFT's epochs the model has memorised its training prompts (on the
    tiny preset its sampled answers solve 75% of SFT's copy prompts and 51% of held-out ones), so rewards
    on those prompts reinforce recall, not the skill that the held-out split measures."""
    exclude = {e.prompt for split in splits for e in split}
    return _draw(config, passages, config.seed + 2, per_task, exclude)


def as_conversation(example: Example) -> Conversation:
    return Conversation(
        messages=(Message(role="user", content=example.prompt), Message(role="assistant", content=example.answer))
    )


def corrupt(example: Example, rng: random.Random) -> str:
    """A wrong answer of the right shape: a shifted number, or words in another order / one word changed."""
    words = example.answer.split()
    if example.task == "arithmetic":
        return str(int(example.answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    if len(words) > 1:
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    return rng.choice([w for w in WORDS if w != example.answer])


# ---------------------------------------------------------------------------------------------------------
# User-provided files


def _read_jsonl(path: Path, model: type[BaseModel]) -> list:
    if not path.is_file():  # a ValueError, so config validation reports it like any other bad field
        raise ValueError(f"{path} does not exist")
    records, errors = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            errors.append(f"{path}:{number}: {where}: {first['msg']}")
    if errors:
        raise ValueError(f"{len(errors)} malformed line(s):\n" + "\n".join(errors[:20]))
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def read_sft_jsonl(path: str | Path) -> list[Conversation]:
    """`{"messages": [{"role", "content"}, ...]}` per line; malformed lines are reported with numbers."""
    return _read_jsonl(Path(path), Conversation)


def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """`{"prompt", "chosen", "rejected"}` per line; malformed lines are reported with numbers."""
    return _read_jsonl(Path(path), PreferencePair)


def write_jsonl(records: Sequence[BaseModel], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in records))
    return path
