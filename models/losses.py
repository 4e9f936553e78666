"""Training losses as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: logits (B, T, V) at position t predict tokens[:, t + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al., 2015).

    Used for in-place distillation: the teacher is the full model's detached logits from the same batch.
    """
    t = temperature
    vocab = student.shape[-1]
    log_p_student = F.log_softmax(student.float().reshape(-1, vocab) / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float().reshape(-1, vocab) / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t
