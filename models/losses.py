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
