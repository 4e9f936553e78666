"""One elastic training step: the sub-models the sampling plan picks are trained on the same batch.

The full model's loss, each sampled sub-model's LM loss and in-place distillation from the full model's logits
(with their ramped weights), load balancing for every sampled sub-model, optional gradient surgery that removes
the sub-models' components conflicting with the full model's gradient (NASViT), and the reductions of losses and
routing statistics over processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator

from models.losses import DistillationTarget, causal_lm_loss, distillation_loss
from models.moe import ElasticMoE, RoutingStats
from tasks.pretrain.config import PretrainConfig
from tasks.pretrain.sampling import StepPlan, plan_step


@dataclass
class StepLosses:
    """What one elastic forward/backward produced, for logging and load balancing."""

    full: float = float("nan")
    subnets: list[float] = field(default_factory=list)
    aux: float = 0.0
    z: float = 0.0
    routing: list[RoutingStats] = field(default_factory=list)


def plan_for_step(config: PretrainConfig, model: ElasticMoE, step: int) -> StepPlan:
    """The members `step` trains under the run's elastic recipe (see tasks.pretrain.sampling)."""
    return plan_step(
        config.sampling, config.elastic, model.config, model.importance(), config.seed, step, config.total_steps()
    )


def elastic_forward_backward(
    model: torch.nn.Module,
    config: PretrainConfig,
    batch: torch.Tensor,
    plan: StepPlan,
    backward,
) -> StepLosses:
    """Forward and backward of every member of the step's plan on one batch (one graph alive at a time).

    The full model runs first with weight 1; every sub-model's loss (its own LM loss times subnet_lm_weight, its
    load balancing and, under `sandwich`, distillation from the full model's detached logits) is multiplied by
    the plan's ramp factor.
    """
    sampling = config.sampling
    losses = StepLosses()
    teacher: DistillationTarget | None = None
    distill = sampling.policy == "sandwich" and sampling.distill_weight > 0 and len(plan.members) > 1
    surgery = sampling.project_conflicts and len(plan.members) > 1
    params = [p for p in model.parameters() if p.requires_grad]
    earlier = take_grads(params) if surgery else []  # earlier micro-batches' gradients, kept aside
    full_grads: list[torch.Tensor | None] = []
    for spec in plan.members:
        out = model(batch, subnet=spec)
        lm = causal_lm_loss(out.logits, batch)
        balancing = out.balancing_loss(config.model)
        if spec is None:
            loss = lm + balancing
            losses.full = lm.item()
            losses.aux, losses.z = out.aux_loss.item(), out.z_loss.item()
            if distill:
                teacher = DistillationTarget.from_logits(out.logits, sampling.distill_temperature)
        else:
            loss = sampling.subnet_lm_weight * lm + balancing
            if teacher is not None:
                loss = loss + sampling.distill_weight * distillation_loss(out.logits, teacher)
            loss = plan.subnet_scale * loss
            losses.subnets.append(lm.item())
        losses.routing.extend(out.routing)
        backward(loss)
        if surgery and spec is None:
            full_grads = take_grads(params)
    if surgery:
        for param, before, full in zip(params, earlier, full_grads, strict=True):
            param.grad = sum_grads(before, full, project_conflict(param.grad, full))
    return losses


def take_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """The parameters' gradients, which are then cleared so the next backward writes only its own."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def project_conflict(grad: torch.Tensor | None, reference: torch.Tensor | None) -> torch.Tensor | None:
    """`grad` without its component along `reference` when the two point against each other (PCGrad / NASViT)."""
    if grad is None or reference is None:
        return grad
    dot = (grad * reference).sum()
    if dot >= 0:
        return grad
    return grad - dot / reference.pow(2).sum().clamp(min=1e-30) * reference


def sum_grads(*grads: torch.Tensor | None) -> torch.Tensor | None:
    total = None
    for grad in grads:
        if grad is not None:
            total = grad if total is None else total + grad
    return total


def mean_over_processes(accelerator: Accelerator, routing: list[RoutingStats]) -> list[RoutingStats]:
    """Routing loads averaged over processes (one all-reduce), so every process moves its selection biases alike
    and by the global batch's load, as one process would."""
    if accelerator.num_processes == 1 or not routing:
        return routing
    flat = accelerator.reduce(torch.cat([s.expert_load for s in routing]), reduction="mean")
    sizes = [s.expert_load.numel() for s in routing]
    return [replace(s, expert_load=load) for s, load in zip(routing, flat.split(sizes), strict=True)]


def losses_over_processes(accelerator: Accelerator, losses: StepLosses) -> StepLosses:
    """The step's losses averaged over processes: the global batch's losses (each process holds equal rows)."""
    if accelerator.num_processes == 1:
        return losses
    local = torch.tensor([losses.full, losses.aux, losses.z, *losses.subnets], device=accelerator.device)
    full, aux, z, *subnets = accelerator.reduce(local, reduction="mean").tolist()
    return StepLosses(full=full, subnets=subnets, aux=aux, z=z, routing=losses.routing)
