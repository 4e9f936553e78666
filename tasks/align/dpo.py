"""Direct Preference Optimization against the frozen SFT model, on preference pairs whose rejected answers are the
model's own mistakes where it makes them (on-policy) and corrupted answers elsewhere."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.chat_format import ChatTokenizer
from models.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs
from models.moe import ElasticMoE
from tasks.align.config import DPOConfig
from tasks.align.sft import EncodedConversation, collate, encode, exact_match, generate_reply
from tasks.common.training_loop import TrainingLoop
from tasks.data.task_mix import (
    Conversation,
    Example,
    Message,
    PreferencePair,
    corrupt,
)


def preference_pairs(
    model: ElasticMoE, tokenizer: ChatTokenizer, examples: Sequence[Example], max_new_tokens: int, seed: int
) -> tuple[list[PreferencePair], dict[str, int]]:
    """chosen = the correct answer; rejected = the model's own wrong greedy answer (on-policy) when it has
    one, else a corrupted answer. Returns the pairs and how many of each kind."""
    rng = random.Random(seed)
    pairs, counts = [], {"on_policy": 0, "corrupted": 0}
    was_training = model.training
    model.eval()
    for example in examples:
        reply = generate_reply(model, tokenizer, example.prompt, max_new_tokens)
        if reply.strip() and not example.check(reply):
            rejected, source = reply.strip(), "on_policy"
        else:
            rejected, source = corrupt(example, rng), "corrupted"
        counts[source] += 1
        pairs.append(
            PreferencePair(prompt=example.prompt, chosen=example.answer, rejected=rejected, rejected_source=source)
        )
    model.train(was_training)
    return pairs, counts


def encode_pair(
    pair: PreferencePair, tokenizer: ChatTokenizer, max_len: int
) -> tuple[EncodedConversation, EncodedConversation]:
    user = Message(role="user", content=pair.prompt)

    def reply(content: str) -> EncodedConversation:
        return encode(Conversation(messages=(user, Message(role="assistant", content=content))), tokenizer, max_len)

    return reply(pair.chosen), reply(pair.rejected)


@dataclass(frozen=True)
class PreferenceMetrics:
    reward_accuracy: float  # fraction of pairs whose chosen reward exceeds the rejected one
    chosen_reward: float
    rejected_reward: float
    margin: float


@dataclass(frozen=True)
class DPOResult:
    losses: list[float]
    train_pair_kinds: dict[str, int]
    held_out: PreferenceMetrics
    accuracy_after: dict[str, float]


def _pair_logprobs(
    model: torch.nn.Module, pairs: Sequence[tuple[EncodedConversation, EncodedConversation]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected replies (one forward over the stacked batch), and the
    number of chosen reply tokens."""
    tokens, targets = collate([c for c, _ in pairs] + [r for _, r in pairs], pad)
    device = next(model.parameters()).device
    targets = targets.to(device)
    logps = sequence_logprobs(model(tokens.to(device)).logits, targets)
    n = len(pairs)
    return logps[:n], logps[n:], (targets[:n] != IGNORE_INDEX).sum(-1)


@torch.no_grad()
def preference_metrics(
    policy: ElasticMoE, reference: ElasticMoE, pairs: Sequence, config: DPOConfig, pad: int
) -> PreferenceMetrics:
    chosen, rejected = [], []
    for start in range(0, len(pairs), config.batch_size):
        batch = pairs[start : start + config.batch_size]
        pc, pr, _ = _pair_logprobs(policy, batch, pad)
        rc, rr, _ = _pair_logprobs(reference, batch, pad)
        _, c, r = dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing, config.loss_type)
        chosen.append(c)
        rejected.append(r)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return PreferenceMetrics(float((c > r).float().mean()), float(c.mean()), float(r.mean()), float((c - r).mean()))


def run_dpo(
    config: DPOConfig,
    policy: ElasticMoE,
    tokenizer: ChatTokenizer,
    train: Sequence[Example],
    test: Sequence[Example],
    extra_pairs: Sequence[PreferencePair] = (),
) -> DPOResult:
    """DPO of `policy` (in place) against a frozen copy of itself; on-policy pairs from its own mistakes."""
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pad = tokenizer.pad_id
    prompts = list(train)
    if config.max_pairs is not None and config.max_pairs < len(prompts):
        prompts = random.Random(config.seed).sample(prompts, config.max_pairs)
    train_pairs, kinds = preference_pairs(policy, tokenizer, prompts, config.max_new_tokens, config.seed)
    test_pairs, _ = preference_pairs(policy, tokenizer, test, config.max_new_tokens, config.seed + 1)
    encoded = [encode_pair(p, tokenizer, config.max_len) for p in [*train_pairs, *extra_pairs]]
    held_out = [encode_pair(p, tokenizer, config.max_len) for p in test_pairs]
    loop = TrainingLoop(policy, config.optim, config.steps)
    reference.to(loop.device)
    rng = random.Random(config.seed)
    losses = []
    loop.model.train()
    for _ in loop.steps("dpo"):
        batch = rng.sample(encoded, min(config.batch_size, len(encoded)))
        pc, pr, n_chosen = _pair_logprobs(loop.model, batch, pad)
        with torch.no_grad():
            rc, rr, _ = _pair_logprobs(reference, batch, pad)
        loss, _, _ = dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing, config.loss_type)
        if config.chosen_nll_weight > 0:  # keep the chosen answers likely, not only preferred (RPO)
            loss = loss + config.chosen_nll_weight * (-pc / n_chosen.clamp(min=1)).mean()
        loop.update(loss)
        losses.append(loss.item())
    core = loop.core.eval()
    metrics = preference_metrics(core, reference, held_out, config, pad)
    return DPOResult(losses, kinds, metrics, exact_match(core, tokenizer, test, config.max_new_tokens))
