"""Supervised fine-tuning on chat data: the loss counts the assistant's tokens only.

Accuracy is exact match per task on the held-out split, with greedy KV-cache generation that stops at the
end-of-turn token, so base, SFT and DPO numbers compare directly (DPO reuses `exact_match` and `generate_reply`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.chat_format import ChatTokenizer
from models.generate import greedy_generate
from models.losses import IGNORE_INDEX, masked_lm_loss
from models.moe import ElasticMoE
from tasks.align.config import SFTConfig
from tasks.common.replay import replay_loss
from tasks.common.training_loop import TrainingLoop
from tasks.data.sampling import TrainingMix
from tasks.data.task_mix import (
    Conversation,
    Example,
    Message,
    as_conversation,
    exact_match_by_task,
)


@dataclass(frozen=True)
class EncodedConversation:
    tokens: list[int]
    targets: list[int]  # targets[t] = tokens[t + 1] where that token is trained, else IGNORE_INDEX


def encode(conversation: Conversation, tokenizer: ChatTokenizer, max_len: int) -> EncodedConversation:
    """Tokens and next-token targets that count only the assistant's reply (and its end-of-turn)."""
    ids, mask = tokenizer.render(conversation.messages)
    ids, mask = ids[:max_len], mask[:max_len]
    targets = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return EncodedConversation(ids, targets)


def collate(batch: Sequence[EncodedConversation], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) tokens and targets; causal attention never lets pads reach real positions."""
    width = max(len(e.tokens) for e in batch)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        tokens[row, : len(example.tokens)] = torch.tensor(example.tokens)
        targets[row, : len(example.targets)] = torch.tensor(example.targets)
    return tokens, targets


@torch.no_grad()
def generate_reply(model: ElasticMoE, tokenizer: ChatTokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy reply to one user turn, up to its end-of-turn token."""
    end = tokenizer.end_of_turn_id
    ids, _ = tokenizer.render([Message(role="user", content=prompt)], add_generation_prompt=True)
    device = next(model.parameters()).device
    room = model.config.max_seq_len - len(ids)
    out = greedy_generate(model, torch.tensor([ids], device=device), min(max_new_tokens, room), eos_id=end)
    reply = out[0, len(ids) :].tolist()
    return tokenizer.decode(reply[: reply.index(end)] if end in reply else reply)


def exact_match(
    model: ElasticMoE, tokenizer: ChatTokenizer, examples: Sequence[Example], max_new_tokens: int
) -> dict[str, float]:
    """Held-out accuracy per task (and `overall`): the generated reply must equal the answer."""
    was_training = model.training
    model.eval()
    accuracy = exact_match_by_task(examples, lambda prompt: generate_reply(model, tokenizer, prompt, max_new_tokens))
    model.train(was_training)
    return accuracy


@dataclass(frozen=True)
class SFTResult:
    losses: list[float]  # per step
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]


def run_sft(
    config: SFTConfig,
    model: ElasticMoE,
    tokenizer: ChatTokenizer,
    train: Sequence[Example],
    test: Sequence[Example],
    extra: Sequence[Conversation] = (),
    replay: TrainingMix | None = None,
) -> SFTResult:
    """Fine-tune `model` in place on the training examples (plus `extra` conversations), replaying windows of
    `replay` (pre-training data) when `config.replay.batch_size` > 0; measure held-out exact match
    before and after."""
    if config.replay.batch_size and replay is None:
        raise ValueError("sft.replay.batch_size > 0 needs the pre-training data to replay")
    encoded = [encode(as_conversation(e), tokenizer, config.max_len) for e in train]
    encoded += [encode(c, tokenizer, config.max_len) for c in extra]
    # a conversation cut at max_len before its reply has nothing to learn, and a batch of only such has a NaN loss
    kept = [e for e in encoded if any(t != IGNORE_INDEX for t in e.targets)]
    if not kept:
        raise ValueError(f"sft.max_len={config.max_len}: every conversation is cut before its reply; raise it")
    if len(kept) < len(encoded):
        print(f"SFT leaves out {len(encoded) - len(kept)} conversations cut at sft.max_len before their reply")
    encoded = kept
    before = exact_match(model, tokenizer, test, config.max_new_tokens)
    pad = tokenizer.pad_id
    loop = TrainingLoop(model, config.optim, config.steps)
    rng = random.Random(config.seed)
    replay_rng = np.random.default_rng(config.seed)
    losses = []
    loop.model.train()
    for _ in loop.steps("sft"):
        tokens, targets = collate(rng.sample(encoded, min(config.batch_size, len(encoded))), pad)
        out = loop.model(tokens.to(loop.device))
        loss = masked_lm_loss(out.logits, targets.to(loop.device))
        total = loss + out.balancing_loss(loop.core.config)
        if config.replay.batch_size and replay is not None:
            total = total + replay_loss(loop.model, replay, config.replay, config.max_len, replay_rng, loop.device)
        loop.update(total)
        losses.append(loss.item())
    after = exact_match(loop.core, tokenizer, test, config.max_new_tokens)
    return SFTResult(losses, before, after)
