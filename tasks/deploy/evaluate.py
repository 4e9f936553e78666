"""Held-out evaluation of a deployable chat package, run with onnxruntime exactly as it is served.

One function measures what the export stage compares variants on and what the gate compares candidate and
champion on: validation perplexity on fixed windows of the validation split, exact match on the held-out
instruction tasks (greedy, KV cache, stopping at end of turn), and greedy decode speed at batch 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.chat_format import Message
from serving.engine import EVERY_TOKEN, MODEL_FILE, ChatPackage
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.data.sampling import sample_batch
from tasks.data.task_mix import Example, corpus_passages, exact_match_by_task, generate_splits
from tasks.deploy.config import EvaluationConfig


@dataclass(frozen=True)
class PackageEvaluation:
    val_nll: float  # mean next-token NLL on the validation windows, nats
    val_ppl: float
    accuracy: dict[str, float]  # exact match per task and `overall`
    tokens_per_second: float  # greedy decode, batch 1, `threads` threads, KV cache
    size_bytes: int  # the ONNX file

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        metrics = {
            f"{prefix}val_nll": self.val_nll,
            f"{prefix}val_ppl": self.val_ppl,
            f"{prefix}tokens_per_second": self.tokens_per_second,
            f"{prefix}size_bytes": self.size_bytes,
        }
        return metrics | {f"{prefix}accuracy/{k}": v for k, v in self.accuracy.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_examples(data: PreparedData, tasks: TaskMixConfig) -> list[Example]:
    """The alignment stage's held-out split (same seeds, same corpus passages)."""
    return generate_splits(tasks, corpus_passages("\n".join(data.documents())), data.images)[1]


def validation_windows(data: PreparedData, config: EvaluationConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(config.seed)
    val = data.split("val")
    return [sample_batch(val, config.batch_size, config.seq_len, rng).numpy() for _ in range(config.val_batches)]


def package_accuracy(package: ChatPackage, examples: list[Example], max_new_tokens: int) -> dict[str, float]:
    def reply(text: str) -> str:
        prompt = package.chat_prompt([Message(role="user", content=text)])
        return package.complete(prompt, min(max_new_tokens, package.room_for(prompt))).text

    return exact_match_by_task(examples, reply)


def decode_speed(package: ChatPackage, prompts: list[list[int]], new_tokens: int) -> float:
    """Greedy tokens/s over `prompts` (every token forced, no early stop), after one warm-up prompt."""
    package.complete(prompts[0], 4, EVERY_TOKEN)
    generated, start = 0, time.perf_counter()
    for prompt in prompts:
        generated += package.complete(prompt, min(new_tokens, package.room_for(prompt)), EVERY_TOKEN).completion_tokens
    return generated / (time.perf_counter() - start)


def evaluate_package(
    package_dir: str | Path, data: PreparedData, examples: list[Example], config: EvaluationConfig
) -> PackageEvaluation:
    """Perplexity, task accuracy and decode speed of the package in `package_dir`."""
    package = ChatPackage(package_dir, threads=config.threads)
    windows = validation_windows(data, config)
    nll = sum(package.generator.mean_nll(w) for w in windows) / len(windows)
    accuracy = package_accuracy(package, examples, config.max_new_tokens)
    prompts = [package.chat_prompt([Message(role="user", content=e.prompt)]) for e in examples]
    speed = decode_speed(package, prompts[: config.speed_prompts], config.speed_new_tokens)
    size = (Path(package_dir) / MODEL_FILE).stat().st_size
    return PackageEvaluation(nll, math.exp(nll), accuracy, speed, size)
