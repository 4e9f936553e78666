"""Training losses as pure functions.

Both avoid slicing the (B, T, V) logits: the backward of a slice allocates and fills a gradient the size of
the whole logits tensor, which on CPU cost more than the loss itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> targets (B, T): position t predicts tokens[:, t + 1]; the last position is ignored."""
    pad = tokens.new_full((tokens.shape[0], 1), IGNORE_INDEX)
    return torch.cat([tokens[:, 1:], pad], dim=1)


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of logits (B, T, V) against aligned targets (B, T); IGNORE_INDEX entries do not count."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of logits (B, T, V) on tokens (B, T)."""
    return masked_lm_loss(logits, next_token_targets(tokens))


@dataclass(frozen=True)
class DistillationTarget:
    """The teacher's softened distribution, computed once per batch and shared by every student."""

    probs: torch.Tensor  # (N, V) softmax(teacher / T), detached
    entropy: torch.Tensor  # scalar mean entropy of `probs`, so the loss is the KL divergence itself
    temperature: float

    @classmethod
    def from_logits(cls, teacher: torch.Tensor, temperature: float) -> DistillationTarget:
        with torch.no_grad():
            log_probs = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
            probs = log_probs.exp()
            entropy = -(probs * log_probs).sum(-1).mean()
        return cls(probs, entropy, temperature)


def distillation_loss(student: torch.Tensor, target: DistillationTarget) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al., 2015).

    Computed as the soft-target cross entropy minus the teacher's entropy: the same value and gradient as
    KL, without an exp over the teacher per student. Used for in-place distillation from the full model.
    """
    t = target.temperature
    logits = student.float().reshape(-1, student.shape[-1])
    if t != 1.0:
        logits = logits / t
    return (F.cross_entropy(logits, target.probs) - target.entropy) * (t * t)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token: logits (B, T, V), targets (B, T) -> (B, T); 0 at IGNORE_INDEX."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    keep = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * keep


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the target tokens per row: logits (B, T, V), targets (B, T) -> (B,).

    IGNORE_INDEX positions (prompt, padding) contribute nothing.
    """
    return token_logprobs(logits, targets).sum(dim=-1)


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al., 2024): each answer's reward against its group's, rewards (N, G) -> advantages (N, G):
    minus the group mean, divided by the group's standard deviation when `scale` (Dr. GRPO, Liu et al., 2025,
    leaves the division out). A group whose rewards are all equal gets zeros: it carries no signal."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True) + eps)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    token_level: bool = False,
) -> torch.Tensor:
    """PPO's clipped surrogate on answer tokens: logprobs/old_logprobs/mask (B, T), advantages (B,) -> scalar.

    The probability ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO, Yu et al., 2025: a higher upper
    bound keeps exploration alive); `token_level` averages over every answer token of the batch (DAPO) instead of
    per answer then per batch (GRPO), so long answers are not down-weighted."""
    ratio = torch.exp(logprobs - old_logprobs)
    gain = advantages[:, None]
    per_token = -torch.minimum(ratio * gain, ratio.clamp(1 - clip_low, 1 + clip_high) * gain)
    mask = mask.to(per_token.dtype)
    if token_level:
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def group_weights(answer_tokens: torch.Tensor, token_level: bool) -> torch.Tensor:
    """How much each rollout group's loss counts in a step's, from its answer tokens (G,) -> (G,) summing to 1.

    Each group's loss is a mean over its own answers (GRPO) or its own tokens (`token_level`, DAPO). Groups hold as
    many answers each, so the batch's mean over answers is the plain mean of the groups'; its mean over tokens weighs
    each group by its tokens: averaged plainly, a group of long answers would count as much as one of short ones,
    the down-weighting DAPO's token-level loss removes."""
    if not token_level:
        return torch.full(answer_tokens.shape, 1.0 / answer_tokens.numel(), device=answer_tokens.device)
    tokens = answer_tokens.to(torch.float32)
    return tokens / tokens.sum().clamp(min=1.0)


def kl_to_reference(logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per answer token, averaged over `mask` (B, T): unbiased
    and never negative, as GRPO uses it."""
    delta = reference_logprobs - logprobs
    mask = mask.to(delta.dtype)
    return ((torch.exp(delta) - delta - 1) * mask).sum() / mask.sum().clamp(min=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023) on sequence log-probabilities (B,).

    `sigmoid`: -log sigmoid(beta * margin), with conservative label smoothing (cDPO) when > 0; `ipo`:
    (margin' - 1 / (2 beta))^2 with margin' the unscaled log-ratio difference (Azar et al., 2023).
    Returns the mean loss and the implicit rewards beta * (policy - reference) of chosen and rejected.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "ipo":
        losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        raise ValueError(f"loss_type: expected 'sigmoid' or 'ipo', got {loss_type!r}")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
