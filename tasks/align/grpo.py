"""Reinforcement learning with verifiable rewards after SFT/DPO, as ERNIE 5.0's post-training does: GRPO.

For each prompt the policy samples a group of answers (models.generate.sample_group, with the server's sampler);
the task's own checker scores each (1 if exact, plus an optional format reward for ending the turn), and each
answer's advantage is its reward against its group's (models.losses.group_advantages). The policy moves along
PPO's clipped surrogate (models.losses.clipped_policy_loss, with DAPO's asymmetric clipping and token-level
averaging as options), with an optional KL anchor to the starting model (off by default, as in current practice)
and pre-training windows replayed as SFT does, so language modelling survives.

The prompts are fresh ones of the same tasks (grpo_prompts): SFT's own prompts are memorised by then, and rewards
on them would teach recall rather than the skill the held-out split measures.

A group whose answers all succeed or all fail carries no signal. The curriculum samples tasks by their recent
success rate p with weight p(1 - p) (floored), so groups keep their spread; the fraction of useful groups is
logged every step.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.chat_format import ChatTokenizer, Message
from models.generate import sample_group
from models.losses import IGNORE_INDEX, clipped_policy_loss, group_advantages, group_weights, kl_to_reference
from models.losses import token_logprobs as answer_token_logprobs
from models.moe import ElasticMoE
from models.sampling import Sampler, choice_generators
from tasks.align.config import GRPOConfig
from tasks.align.sft import exact_match
from tasks.common.replay import replay_loss
from tasks.common.training_loop import TrainingLoop
from tasks.data.config import TaskMixConfig
from tasks.data.images import PreparedImages
from tasks.data.sampling import TrainingMix
from tasks.data.task_mix import Example, fresh_examples

MIN_TASK_WEIGHT = 0.05  # a task every group solves (or none does) is still drawn now and then


@dataclass
class TaskCurriculum:
    """Recent success rate per task (an exponential average over its groups) and the draw it implies."""

    tasks: list[str]
    decay: float = 0.8
    rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rates = dict.fromkeys(self.tasks, 0.5)

    def weights(self) -> list[float]:
        return [max(p * (1 - p), MIN_TASK_WEIGHT) for p in (self.rates[t] for t in self.tasks)]

    def update(self, task: str, success_rate: float) -> None:
        self.rates[task] = self.decay * self.rates[task] + (1 - self.decay) * success_rate


@dataclass(frozen=True)
class Rollout:
    """One prompt's group: its tokens (B=G, T) with targets on the answer tokens only, and its rewards."""

    tokens: torch.Tensor
    targets: torch.Tensor
    rewards: torch.Tensor  # (G,)
    solved: torch.Tensor  # (G,) bool: the task's checker accepted the answer
    lengths: list[int]


@dataclass
class GRPOResult:
    metrics: list[dict[str, float]]  # per step: reward mean/std, useful groups, length, KL, loss, learning rate
    held_out: list[dict[str, float]]  # per measurement: step, exact_match/<task> (greedy pass@1), pass_at_k
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]


def answer_reward(text: str, example: Example, finished: bool, solved: bool, config: GRPOConfig) -> float:
    """1 for a solved task; else, when the answer ended its turn, `partial_credit` times its similarity to a right
    one (word-level for text; for a drawing, the judge's probability of the digit asked for); plus `format_reward`
    for ending the turn at all. A drawing's reward is the judge's verdict: unified multimodal RL in miniature."""
    partial = example.similarity(text) if finished and not solved else 0.0
    return float(solved) + config.partial_credit * partial + config.format_reward * finished


def rollout(
    model: ElasticMoE, tokenizer: ChatTokenizer, example: Example, config: GRPOConfig, rng_seed: int
) -> Rollout:
    """Sample `group_size` answers to one prompt and reward each with the task's checker."""
    prompt, _ = tokenizer.render([Message(role="user", content=example.prompt)], add_generation_prompt=True)
    end = tokenizer.end_of_turn_id
    room = min(config.max_new_tokens, model.config.max_seq_len - len(prompt))
    vocab = model.config.vocab_size
    samplers = [
        Sampler(config.rollout_params(), vocab, prompt, g) for g in choice_generators(rng_seed, config.group_size)
    ]
    answers = sample_group(model, prompt, samplers, room, {end})
    rewards, solved = [], []
    for answer in answers:
        finished = answer[-1] == end
        text = tokenizer.decode(answer[:-1] if finished else answer)
        solved.append(finished and example.check(text))
        rewards.append(answer_reward(text, example, finished, solved[-1], config))
    width = len(prompt) + max(len(a) for a in answers)
    tokens = torch.full((len(answers), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(answers), width), IGNORE_INDEX, dtype=torch.long)
    for row, answer in enumerate(answers):
        sequence = torch.tensor(prompt + answer)
        tokens[row, : len(sequence)] = sequence
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)  # position t predicts t + 1
    return Rollout(tokens, targets, torch.tensor(rewards), torch.tensor(solved), [len(a) for a in answers])


def pass_at_k(model: ElasticMoE, tokenizer: ChatTokenizer, examples: Sequence[Example], config: GRPOConfig) -> float:
    """Held-out pass@k: a prompt counts if any of k sampled answers is exact."""
    k_config = config.model_copy(update={"group_size": config.pass_k})
    solved = [
        bool(rollout(model, tokenizer, e, k_config, config.seed + 7919 + i).solved.any())
        for i, e in enumerate(examples)
    ]
    return float(np.mean(solved)) if solved else 0.0


def grpo_prompts(
    config: GRPOConfig,
    task_mix: TaskMixConfig,
    passages: Sequence[str],
    train: Sequence[Example],
    test: Sequence[Example],
    images: PreparedImages | None = None,
) -> list[Example]:
    """The prompts GRPO samples from: fresh ones of the same tasks (none in `train` or `test`), or `train` itself."""
    if not config.fresh_prompts_per_task:
        return list(train)
    return fresh_examples(task_mix, passages, config.fresh_prompts_per_task, [train, test], images)


def _weights(curriculum: TaskCurriculum, config: GRPOConfig) -> list[float] | None:
    return curriculum.weights() if config.curriculum else None


def _exact_match(measurement: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("exact_match/"): v for k, v in measurement.items() if k.startswith("exact_match/")}


def _answer_logprobs(model: torch.nn.Module, batch: Rollout, device: torch.device, temperature: float) -> torch.Tensor:
    """The answer tokens' log-probabilities under the distribution the rollouts were sampled from (the logits at
    the sampling temperature, as TRL scores them): otherwise, at a temperature other than 1, the probability
    ratios and the KL would compare another policy than the one that acted."""
    return answer_token_logprobs(model(batch.tokens.to(device)).logits / temperature, batch.targets.to(device))


def run_grpo(
    config: GRPOConfig,
    policy: ElasticMoE,
    tokenizer: ChatTokenizer,
    prompts: Sequence[Example],
    test: Sequence[Example],
    replay: TrainingMix | None = None,
) -> GRPOResult:
    """GRPO of `policy` (in place) on `prompts` (see grpo_prompts); held-out pass@1 (greedy) and pass@k measured
    along."""
    if config.replay.batch_size and replay is None:
        raise ValueError("grpo.replay.batch_size > 0 needs the pre-training data to replay")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    loop = TrainingLoop(policy, config.optim, config.steps)
    model, device = loop.model, loop.device
    reference.to(device)
    by_task: dict[str, list[Example]] = {}
    for example in prompts:
        by_task.setdefault(example.task, []).append(example)
    curriculum = TaskCurriculum(sorted(by_task))
    rng = random.Random(config.seed)
    replay_rng = np.random.default_rng(config.seed)
    core = loop.core

    def measure(step: int) -> dict[str, float]:
        accuracy = exact_match(core, tokenizer, test, config.max_new_tokens)
        return {
            "step": float(step),
            **{f"exact_match/{k}": v for k, v in accuracy.items()},
            "pass_at_k": pass_at_k(core, tokenizer, test, config),
        }

    held_out = [measure(0)]
    before = _exact_match(held_out[0])
    metrics = []
    for step in loop.steps("grpo"):
        core.eval()
        tasks = rng.choices(curriculum.tasks, weights=_weights(curriculum, config), k=config.prompts_per_step)
        rollouts, drawn, flat_groups = [], 0, 0
        while tasks:
            task = tasks.pop()
            example = rng.choice(by_task[task])
            batch = rollout(core, tokenizer, example, config, config.seed * 1_000_003 + step * 4096 + drawn)
            drawn += 1
            curriculum.update(task, float(batch.solved.float().mean()))
            flat = bool(batch.rewards.std() == 0)
            flat_groups += flat
            if flat and drawn + len(tasks) < config.dynamic_sampling * config.prompts_per_step:
                tasks.append(rng.choices(curriculum.tasks, weights=_weights(curriculum, config))[0])
                continue  # DAPO's dynamic sampling: a group that all agree teaches nothing; draw another
            rollouts.append(batch)
        core.train()
        advantages = [group_advantages(r.rewards[None], config.scale_advantages)[0] for r in rollouts]
        with torch.no_grad():
            old = [_answer_logprobs(model, r, device, config.temperature) for r in rollouts]
            ref = [_answer_logprobs(reference, r, device, config.temperature) for r in rollouts]
        answer_tokens = torch.stack([(r.targets != IGNORE_INDEX).sum() for r in rollouts]).to(device)
        weights = group_weights(answer_tokens, config.token_level)
        for _ in range(config.updates_per_rollout):
            losses, kls = [], []
            for r, a, o, rf in zip(rollouts, advantages, old, ref, strict=True):
                logprobs = _answer_logprobs(model, r, device, config.temperature)
                mask = r.targets.to(device) != IGNORE_INDEX
                losses.append(
                    clipped_policy_loss(
                        logprobs, o, a.to(device), mask, config.clip_low, config.clip_high, config.token_level
                    )
                )
                kls.append(kl_to_reference(logprobs, rf, mask))
            loss, kl = (torch.stack(losses) * weights).sum(), (torch.stack(kls) * weights).sum()
            total = loss + config.kl_coef * kl if config.kl_coef else loss
            if config.replay.batch_size and replay is not None:
                seq_len = config.replay.seq_len or core.config.max_seq_len
                total = total + replay_loss(model, replay, config.replay, seq_len, replay_rng, device)
            loop.update(total)
        rewards = torch.cat([r.rewards for r in rollouts])
        useful = [bool(r.rewards.std() > 0) for r in rollouts]
        metrics.append(
            {
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "useful_groups": float(np.mean(useful)),
                "zero_variance_groups": flat_groups / drawn,  # of all groups drawn, dropped ones included
                "groups_drawn": float(drawn),
                "response_length": float(np.mean([n for r in rollouts for n in r.lengths])),
                "kl": kl.item(),
                "loss": loss.item(),
                "lr": loop.lr,
            }
        )
        if (step + 1) % config.eval_interval == 0 or step + 1 == config.steps:
            held_out.append(measure(step + 1))
    core.eval()
    after = _exact_match(held_out[-1])
    return GRPOResult(metrics, held_out, before, after)
