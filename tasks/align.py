"""Alignment stage: SFT on chat data (loss on assistant tokens only), then DPO against the frozen SFT model.

Accuracy is exact match per task on the held-out split, with greedy KV-cache generation that stops at the
end-of-turn token, so base, SFT (and later DPO) numbers are directly comparable.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from models.chat_format import ChatTokenizer
from models.checkpoint import load_model, save_model
from models.generate import greedy_generate
from models.losses import IGNORE_INDEX, causal_lm_loss, dpo_loss, masked_lm_loss, sequence_logprobs
from models.moe import ElasticMoE
from registry.models import CHAT_TORCH_MODEL, SUBNET_MODEL, register_checkpoint
from registry.tracking import RunLogger, git_commit
from tasks.align_data import (
    Conversation,
    Example,
    Message,
    PreferencePair,
    TaskMixConfig,
    as_conversation,
    check,
    corpus_passages,
    corrupt,
    exact_match_by_task,
    generate_splits,
    read_preference_jsonl,
    read_sft_jsonl,
)
from tasks.data import PreparedData, sample_batch
from tasks.optim import short_run_schedule, warmup_factor
from tasks.stage_results import AlignedModels


class SFTConfig(BaseModel):
    """Supervised fine-tuning on the task mix (and optional user conversations)."""

    model_config = ConfigDict(extra="forbid")

    task_mix: TaskMixConfig = Field(default_factory=TaskMixConfig, description="Generated instruction tasks.")
    extra_jsonl: str | None = Field(
        None, description='Your own conversations, one {"messages": [...]} per line, trained on with the tasks.'
    )
    steps: int = Field(300, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Conversations per batch.")
    max_len: int = Field(128, ge=8, le=1_048_576, description="Longest tokenized conversation; longer are cut.")
    lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW, warm-up then cosine).")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm; larger steps are scaled down.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Generation limit when measuring accuracy.")
    replay_batch_size: int = Field(
        0, ge=0, le=65_536,
        description="Pre-training windows (of max_len tokens) per step trained on with the LM loss beside the "
        "chat batch, so fine-tuning does not erase language modelling; 0 = no replay.",
    )  # fmt: skip
    replay_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the replay LM loss.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order.")

    @model_validator(mode="after")
    def _user_file_parses(self) -> SFTConfig:
        if self.extra_jsonl:  # read now, so a bad file fails before any compute
            read_sft_jsonl(self.extra_jsonl)
        return self


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
    replay_tokens: np.ndarray | None = None,
) -> SFTResult:
    """Fine-tune `model` in place on the training examples (plus `extra` conversations), replaying windows of
    `replay_tokens` (pre-training data) when `config.replay_batch_size` > 0; measure held-out exact match
    before and after."""
    if config.replay_batch_size and replay_tokens is None:
        raise ValueError("sft.replay_batch_size > 0 needs the pre-training tokens to replay")
    accelerator = Accelerator()
    before = exact_match(model, tokenizer, test, config.max_new_tokens)
    encoded = [encode(as_conversation(e), tokenizer, config.max_len) for e in train]
    encoded += [encode(c, tokenizer, config.max_len) for c in extra]
    pad = tokenizer.pad_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    factor = short_run_schedule(config.warmup_steps, config.steps)
    rng = random.Random(config.seed)
    replay_rng = np.random.default_rng(config.seed)
    losses = []
    model.train()
    for step in tqdm(range(config.steps), desc="sft"):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor(step)
        tokens, targets = collate(rng.sample(encoded, min(config.batch_size, len(encoded))), pad)
        out = model(tokens.to(accelerator.device))
        loss = masked_lm_loss(out.logits, targets.to(accelerator.device))
        total = loss + out.balancing_loss(accelerator.unwrap_model(model).config)
        if config.replay_batch_size and replay_tokens is not None:
            window = sample_batch(replay_tokens, config.replay_batch_size, config.max_len, replay_rng)
            window = window.to(accelerator.device)
            replay = model(window)
            total = total + config.replay_weight * causal_lm_loss(replay.logits, window)
        accelerator.backward(total)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    core = accelerator.unwrap_model(model)
    after = exact_match(core, tokenizer, test, config.max_new_tokens)
    return SFTResult(losses, before, after)


# ---------------------------------------------------------------------------------------------------------
# Preference pairs and DPO


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
        if reply.strip() and not check(reply, example.answer):
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


class DPOConfig(BaseModel):
    """Direct Preference Optimization against the frozen SFT model."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, gt=0, le=10, description="Strength of the KL anchor to the reference (DPO beta).")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO's sigmoid loss or IPO's squared loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed fraction of flipped preferences.")
    chosen_nll_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Weight of the chosen answers' per-token NLL added to the DPO loss (RPO, Pang et al., 2024): "
        "plain DPO can lower the chosen answers' likelihood too, which costs exact-match accuracy.",
    )
    steps: int = Field(100, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Preference pairs per batch.")
    max_len: int = Field(128, ge=8, le=1_048_576, description="Longest tokenized conversation; longer are cut.")
    lr: float = Field(2e-4, gt=0, le=1, description="Learning rate (AdamW, constant after the warm-up).")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm; larger steps are scaled down.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Generation limit for on-policy pairs and accuracy.")
    max_pairs: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Training prompts (a seeded sample) turned into preference pairs; each costs one greedy "
        "generation, so there is no point in many more than steps x batch_size. None: every training prompt.",
    )  # fmt: skip
    extra_jsonl: str | None = Field(
        None, description='Your own preference pairs, one {"prompt", "chosen", "rejected"} per line.'
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order and corruptions.")

    @model_validator(mode="after")
    def _user_file_parses(self) -> DPOConfig:
        if self.extra_jsonl:  # read now, so a bad file fails before any compute
            read_preference_jsonl(self.extra_jsonl)
        return self


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
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(policy, optimizer)
    reference.to(accelerator.device)
    rng = random.Random(config.seed)
    losses = []
    model.train()
    for step in tqdm(range(config.steps), desc="dpo"):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_factor(step, config.warmup_steps)
        batch = rng.sample(encoded, min(config.batch_size, len(encoded)))
        pc, pr, n_chosen = _pair_logprobs(model, batch, pad)
        with torch.no_grad():
            rc, rr, _ = _pair_logprobs(reference, batch, pad)
        loss, _, _ = dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing, config.loss_type)
        if config.chosen_nll_weight > 0:  # keep the chosen answers likely, not only preferred (RPO)
            loss = loss + config.chosen_nll_weight * (-pc / n_chosen.clamp(min=1)).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    core = accelerator.unwrap_model(model).eval()
    metrics = preference_metrics(core, reference, held_out, config, pad)
    return DPOResult(losses, kinds, metrics, exact_match(core, tokenizer, test, config.max_new_tokens))


# ---------------------------------------------------------------------------------------------------------
# The pipeline task: SFT then DPO on the extracted sub-model, each registered


def _log_loss_curve(logger: RunLogger, losses: Sequence[float], every: int = 10) -> None:
    for step in range(0, len(losses), every):
        logger.log_metrics({"train/loss": losses[step]}, step=step + 1)


def _accuracy_tags(prefix: str, accuracy: dict[str, float]) -> dict[str, str]:
    return {f"{prefix}_accuracy/{task}": f"{value:.4f}" for task, value in accuracy.items()}


@task(name="align", retries=1, retry_delay_seconds=5)
def align_task(
    sft: SFTConfig, dpo: DPOConfig, subnet_dir: str, data_dir: str, workdir: str, subnet_version: str
) -> AlignedModels:
    """SFT then DPO of the extracted sub-model; both versions registered in `trainonce-chat-torch`."""
    data = PreparedData.load(data_dir)
    tokenizer = data.chat_tokenizer()
    model = load_model(subnet_dir)
    train, test = generate_splits(sft.task_mix, corpus_passages("\n".join(data.documents())))
    out_dir = Path(workdir) / "align" / f"subnet-v{subnet_version}"
    lineage = {"parent_model": f"{SUBNET_MODEL}/{subnet_version}", "parent_subnet_version": subnet_version,
               "data_fingerprint": data.fingerprint, "git_commit": git_commit()}  # fmt: skip

    sft_logger = RunLogger(workdir, run_name="sft", tags={"stage": "sft"})
    sft_logger.log_params({"sft": sft.model_dump(mode="json")})
    extra_conversations = read_sft_jsonl(sft.extra_jsonl) if sft.extra_jsonl else []
    extra_pairs = read_preference_jsonl(dpo.extra_jsonl) if dpo.extra_jsonl else []
    sft_result = run_sft(sft, model, tokenizer, train, test, extra_conversations, data.split("train"))
    _log_loss_curve(sft_logger, sft_result.losses)
    sft_logger.log_metrics(
        {**{f"accuracy_base/{k}": v for k, v in sft_result.accuracy_before.items()},
         **{f"accuracy_sft/{k}": v for k, v in sft_result.accuracy_after.items()}}, step=sft.steps,
    )  # fmt: skip
    sft_dir = save_model(model, out_dir / "sft")
    sft_version = register_checkpoint(
        workdir, sft_logger.run_id, CHAT_TORCH_MODEL, sft_dir, data.tokenizer_path,
        {"stage": "sft", "chat_format": data.chat_format.model_dump(mode="json")},
        {**lineage, "stage": "sft", **_accuracy_tags("base", sft_result.accuracy_before),
         **_accuracy_tags("sft", sft_result.accuracy_after)},
    )  # fmt: skip
    sft_logger.finish()

    dpo_logger = RunLogger(workdir, run_name="dpo", tags={"stage": "dpo"})
    dpo_logger.log_params({"dpo": dpo.model_dump(mode="json")})
    dpo_result = run_dpo(dpo, model, tokenizer, train, test, extra_pairs)
    _log_loss_curve(dpo_logger, dpo_result.losses)
    held_out = dpo_result.held_out
    dpo_logger.log_metrics(
        {"held_out/reward_accuracy": held_out.reward_accuracy, "held_out/chosen_reward": held_out.chosen_reward,
         "held_out/rejected_reward": held_out.rejected_reward, "held_out/margin": held_out.margin,
         **{f"pairs/{k}": v for k, v in dpo_result.train_pair_kinds.items()},
         **{f"accuracy_dpo/{k}": v for k, v in dpo_result.accuracy_after.items()}}, step=dpo.steps,
    )  # fmt: skip
    dpo_dir = save_model(model, out_dir / "dpo")
    dpo_version = register_checkpoint(
        workdir, dpo_logger.run_id, CHAT_TORCH_MODEL, dpo_dir, data.tokenizer_path,
        {"stage": "dpo", "chat_format": data.chat_format.model_dump(mode="json")},
        {**lineage, "stage": "dpo", "parent_sft_version": sft_version.version,
         **_accuracy_tags("sft", sft_result.accuracy_after), **_accuracy_tags("dpo", dpo_result.accuracy_after),
         "reward_accuracy": f"{held_out.reward_accuracy:.4f}", "pairs": json.dumps(dpo_result.train_pair_kinds)},
    )  # fmt: skip
    dpo_logger.finish()
    return AlignedModels(
        sft_uri=sft_version.uri,
        dpo_uri=dpo_version.uri,
        dpo_dir=str(dpo_dir),
        parent_model=lineage["parent_model"],
        accuracy={
            "base": sft_result.accuracy_before,
            "sft": sft_result.accuracy_after,
            "dpo": dpo_result.accuracy_after,
        },
        reward_accuracy=held_out.reward_accuracy,
        pairs=dpo_result.train_pair_kinds,
    )
