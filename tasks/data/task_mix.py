"""Alignment data: instruction tasks with checkable answers, preference pairs, user files.

Every generated example comes from a seed, so train and held-out splits are reproducible and disjoint; every
task has a checker, so accuracy is exact match on what the model generated, not a judge's opinion. With images
(data.images) two more tasks join: reading a digit (exact match on the digit) and drawing one, checked by the
digit judge, a classifier fitted once on the real training digits (the drawing must read as the digit asked for).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.chat_format import Message
from models.digit_judge import DigitJudge
from models.image_tokenizer import ImageTokenizer
from tasks.data.config import TaskMixConfig
from tasks.data.images import PreparedImages


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
class DrawingCheck:
    """How a drawing is checked: the reply's first complete image (`ImageTokenizer.parse`), decoded with the
    codebook, must be read by the judge as `digit`. `decoys` are drawings of other digits (DPO's wrong answers)."""

    image_tokenizer: ImageTokenizer
    judge: DigitJudge
    digit: int
    decoys: tuple[str, ...] = ()

    def probability(self, reply: str) -> float:
        """The judge's probability that the reply's drawing shows `digit` (0 when the reply holds no image)."""
        codes = self.image_tokenizer.parse(reply)
        if codes is None:
            return 0.0
        return float(self.judge.probabilities(self.image_tokenizer.decode(codes))[0, self.digit])

    def passes(self, reply: str) -> bool:
        codes = self.image_tokenizer.parse(reply)
        return codes is not None and int(self.judge.predict(self.image_tokenizer.decode(codes))[0]) == self.digit


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # what SFT trains on: the canonical answer, or one real drawing of the digit asked for
    drawing: DrawingCheck | None = None  # a drawing task: any drawing the judge reads as the digit passes

    def check(self, reply: str) -> bool:
        """Exact match after trimming whitespace (every text task's answer is a short canonical string); a drawing
        passes when the judge reads it as the digit asked for."""
        if self.drawing is not None:
            return self.drawing.passes(reply)
        return reply.strip() == self.answer.strip()

    def similarity(self, reply: str) -> float:
        """How close a wrong reply came, in [0, 1] (GRPO's partial credit): word-level similarity to the answer, or
        the judge's probability of the digit asked for."""
        if self.drawing is not None:
            return self.drawing.probability(reply)
        return SequenceMatcher(None, reply.split(), self.answer.split()).ratio()


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


# Reading a digit: its drawing then the question. Drawing one: a request, in words held out from training for the
# held-out prompts, so the held-out split measures the skill, not recall of a phrasing.
READ_QUESTION = "Which digit is this?"
DRAW_REQUESTS = ("Draw the digit {digit}.", "Draw a {digit}.", "Write the digit {digit} as an image.")
HELD_OUT_DRAW_REQUESTS = ("Show me a handwritten {digit}.", "Make an image of the digit {digit}.")


def _digit_read(images: PreparedImages, split: str) -> Callable[[random.Random], Example]:
    digits = images.split(split)

    def make(rng: random.Random) -> Example:
        i = rng.randrange(len(digits.labels))
        drawing = images.image_tokenizer.text(images.image_tokenizer.encode(digits.pixels[i]))
        return Example("digit_read", f"{drawing} {READ_QUESTION}", str(int(digits.labels[i])))

    return make


def _digit_draw(images: PreparedImages, split: str) -> Callable[[random.Random], Example]:
    """A request to draw a digit; the answer trained on is a real training drawing of it (never a held-out one)."""
    train = images.split("train")
    tokenizer = images.image_tokenizer
    drawings = [tokenizer.text(tokenizer.encode(p)) for p in train.pixels]
    by_digit = {d: [i for i, label in enumerate(train.labels) if label == d] for d in range(10)}
    requests = HELD_OUT_DRAW_REQUESTS if split == "held_out" else DRAW_REQUESTS

    def make(rng: random.Random) -> Example:
        digit = rng.randrange(10)
        decoys = tuple(drawings[rng.choice(by_digit[other])] for other in range(10) if other != digit)
        check = DrawingCheck(tokenizer, images.judge, digit, decoys)
        prompt = rng.choice(requests).format(digit=digit)
        return Example("digit_draw", prompt, drawings[rng.choice(by_digit[digit])], check)

    return make


def exact_match_by_task(examples: Sequence[Example], reply: Callable[[str], str]) -> dict[str, float]:
    """Held-out accuracy per task (and `overall`) of the replies `reply(prompt)` gives; one scorer for every
    runtime (PyTorch during alignment, onnxruntime for deployables), so their numbers compare."""
    hits: dict[str, list[bool]] = {}
    for example in examples:
        hits.setdefault(example.task, []).append(example.check(reply(example.prompt)))
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


def _key(example: Example) -> str:
    """What makes two examples the same: the prompt; for a drawing request (a handful of phrasings) also the drawing
    trained on, so every training drawing can be a distinct example."""
    return example.prompt + ("\x00" + example.answer if example.drawing is not None else "")


def _draw(
    config: TaskMixConfig,
    passages: Sequence[str],
    seed: int,
    per_task: int,
    exclude: set[str],
    images: PreparedImages | None,
    image_split: str,
) -> list[Example]:
    """`per_task` distinct examples of each task from `seed`, none whose key is in `exclude`; the digit tasks draw
    from the `image_split` images (their held-out images and phrasings only for the held-out split)."""
    makers = {"arithmetic": _arithmetic, "copy": _copy, "reverse": _reverse, "sort": _sort, "span": _span(passages)}
    if images is not None:
        makers.update(digit_read=_digit_read(images, image_split), digit_draw=_digit_draw(images, image_split))
    elif {"digit_read", "digit_draw"} & set(config.tasks):
        raise ValueError("sft.task_mix.tasks: digit_read and digit_draw need data.images")
    rng, examples = random.Random(seed), []
    for name in config.tasks:
        seen: set[str] = set()
        for _ in range(per_task * 50):
            if len(seen) == per_task:
                break
            example = makers[name](rng)
            key = _key(example) if image_split == "train" else example.prompt  # held out: each prompt once
            if key not in exclude and key not in seen and example.prompt not in exclude:
                seen.add(key)
                examples.append(example)
    return examples


def generate_splits(
    config: TaskMixConfig, passages: Sequence[str], images: PreparedImages | None = None
) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; a held-out prompt never appears in train (the digit tasks hold out by image:
    held-out drawings to read, and held-out phrasings of the drawing requests)."""
    train = _draw(config, passages, config.seed, config.train_per_task, set(), images, "train")
    exclude = {e.prompt for e in train}
    test = _draw(config, passages, config.seed + 1, config.test_per_task, exclude, images, "held_out")
    return train, test


def fresh_examples(
    config: TaskMixConfig,
    passages: Sequence[str],
    per_task: int,
    splits: Sequence[Sequence[Example]],
    images: PreparedImages | None = None,
) -> list[Example]:
    """Examples of the same tasks whose prompts are in none of `splits` (drawn from seed + 2; drawing requests are
    new (request, drawing) pairs: their reward is the judge's verdict, which recall of a training drawing does not
    earn more than any other good drawing).

    Reinforcement learning needs them: after SFT's epochs the model has memorised its training prompts (on the
    tiny preset its sampled answers solve 75% of SFT's copy prompts and 51% of held-out ones), so rewards
    on those prompts reinforce recall, not the skill that the held-out split measures."""
    exclude = {_key(e) for split in splits for e in split} | {
        e.prompt for split in splits for e in split if e.drawing is None
    }
    return _draw(config, passages, config.seed + 2, per_task, exclude, images, "train")


def as_conversation(example: Example) -> Conversation:
    return Conversation(
        messages=(Message(role="user", content=example.prompt), Message(role="assistant", content=example.answer))
    )


def corrupt(example: Example, rng: random.Random) -> str:
    """A wrong answer of the right shape: a shifted number, words in another order / one word changed, another
    digit, or a drawing of another digit."""
    words = example.answer.split()
    if example.drawing is not None:
        return rng.choice(example.drawing.decoys)
    if example.task == "digit_read":
        return str((int(example.answer) + rng.randint(1, 9)) % 10)
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
