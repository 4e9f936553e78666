"""Alignment stage: supervised fine-tuning on chat data with the loss on assistant tokens only.

Accuracy is exact match per task on the held-out split, with greedy KV-cache generation that stops at the
end-of-turn token, so base, SFT (and later DPO) numbers are directly comparable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from models.generate import greedy_generate
from models.losses import IGNORE_INDEX, masked_lm_loss
from models.moe import ElasticMoE
from tasks.align_data import Conversation, Example, Message, TaskMixConfig, as_conversation, check, render_chat
from tasks.data import END_OF_TURN, PAD
from tasks.pretrain import OptimConfig, cosine_with_warmup


class SFTConfig(BaseModel):
    """Supervised fine-tuning on the task mix (and optional user conversations)."""

    model_config = ConfigDict(extra="forbid")

    tasks: TaskMixConfig = Field(default_factory=TaskMixConfig, description="Generated instruction tasks.")
    steps: int = Field(300, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Conversations per batch.")
    max_len: int = Field(128, ge=8, le=1_048_576, description="Longest tokenized conversation; longer are cut.")
    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW, warm-up then cosine).")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warm-up steps.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Generation limit when measuring accuracy.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order.")


@dataclass(frozen=True)
class EncodedConversation:
    tokens: list[int]
    targets: list[int]  # targets[t] = tokens[t + 1] where that token is trained, else IGNORE_INDEX


def encode(conversation: Conversation, tokenizer: Tokenizer, max_len: int) -> EncodedConversation:
    """Tokens and next-token targets that count only the assistant's reply (and its end-of-turn)."""
    ids, mask = render_chat(conversation.messages, tokenizer)
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
def generate_reply(model: ElasticMoE, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy reply to one user turn, up to its end-of-turn token."""
    end = tokenizer.token_to_id(END_OF_TURN)
    ids, _ = render_chat([Message(role="user", content=prompt)], tokenizer, add_generation_prompt=True)
    device = next(model.parameters()).device
    room = model.config.max_seq_len - len(ids)
    out = greedy_generate(model, torch.tensor([ids], device=device), min(max_new_tokens, room), eos_id=end)
    reply = out[0, len(ids) :].tolist()
    return tokenizer.decode(reply[: reply.index(end)] if end in reply else reply)


def exact_match(
    model: ElasticMoE, tokenizer: Tokenizer, examples: Sequence[Example], max_new_tokens: int
) -> dict[str, float]:
    """Held-out accuracy per task (and `overall`): the generated reply must equal the answer."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    for example in examples:
        reply = generate_reply(model, tokenizer, example.prompt, max_new_tokens)
        hits.setdefault(example.task, []).append(check(reply, example.answer))
    model.train(was_training)
    accuracy = {task: sum(h) / len(h) for task, h in hits.items()}
    accuracy["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return accuracy


@dataclass(frozen=True)
class SFTResult:
    losses: list[float]  # per step
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]


def run_sft(
    config: SFTConfig,
    model: ElasticMoE,
    tokenizer: Tokenizer,
    train: Sequence[Example],
    test: Sequence[Example],
    extra: Sequence[Conversation] = (),
) -> SFTResult:
    """Fine-tune `model` in place on the training examples (plus `extra` conversations); measure held-out
    exact match before and after."""
    accelerator = Accelerator()
    before = exact_match(model, tokenizer, test, config.max_new_tokens)
    encoded = [encode(as_conversation(e), tokenizer, config.max_len) for e in train]
    encoded += [encode(c, tokenizer, config.max_len) for c in extra]
    pad = tokenizer.token_to_id(PAD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    factor = cosine_with_warmup(OptimConfig(warmup_steps=min(config.warmup_steps, config.steps - 1)), config.steps)
    rng = random.Random(config.seed)
    losses = []
    model.train()
    for step in tqdm(range(config.steps), desc="sft"):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor(step)
        tokens, targets = collate(rng.sample(encoded, min(config.batch_size, len(encoded))), pad)
        out = model(tokens.to(accelerator.device))
        loss = masked_lm_loss(out.logits, targets.to(accelerator.device))
        accelerator.backward(loss + out.balancing_loss(accelerator.unwrap_model(model).config))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    core = accelerator.unwrap_model(model)
    after = exact_match(core, tokenizer, test, config.max_new_tokens)
    return SFTResult(losses, before, after)
