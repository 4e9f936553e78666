"""Pre-training stage: one run trains the whole sub-model family of the elastic supernet.

Each optimiser step trains the sub-models the sampling policy picks (ERNIE 5.0's `random`, BigNAS's
`sandwich` with in-place distillation, or the `full` baseline) on the same batch, with load balancing for
every sampled sub-model. The loop runs under HF accelerate (devices, mixed precision, gradient accumulation,
`accelerate launch -m tasks.pretrain` for several processes), validates a fixed panel of sub-models, logs to
MLflow through registry/, and checkpoints so that a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from models.accounting import subnet_cost
from models.checkpoint import load_config, load_model, save_model
from models.config import MoEConfig
from models.importance import measure_importance
from models.losses import DistillationTarget, causal_lm_loss, distillation_loss
from models.moe import ElasticMoE, RoutingStats
from models.subnet import ElasticSpace, SubnetSpec
from registry.models import (
    SUPERNET_MODEL,
    DownloadedCheckpoint,
    RegisteredVersion,
    download_checkpoint,
    register_checkpoint,
    version_tags,
)
from registry.tracking import RunLogger, git_commit
from tasks.chat_format import chat_format_of
from tasks.data import DataConfig, PreparedData, sample_batch
from tasks.elastic_sampling import SamplingConfig, StepPlan, elastic_lr_schedule, plan_step
from tasks.launch import LaunchConfig, run_launched
from tasks.optim import OptimConfig, build_optimizer
from tasks.plots import plot_loss_curves, plot_routing_heatmap
from tasks.throughput import device_peak_flops, training_flops
from tasks.train_checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint

# Settings added after runs were saved, with the value that reproduces how those runs trained: at that value they
# are left out of a run's identity (PretrainConfig.config_hash), so adding a setting never orphans a checkpoint.
LATER_DEFAULTS: dict[str, dict[str, object]] = {"sampling": {"elastic_end": 1.0}}


class PretrainConfig(BaseModel):
    """Everything the pre-training stage needs besides the prepared data."""

    model_config = ConfigDict(extra="forbid")

    model: MoEConfig = Field(default_factory=MoEConfig, description="Supernet shape and routing.")
    elastic: ElasticSpace = Field(default_factory=ElasticSpace, description="The sub-model family trained.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sub-models per step.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    batch_size: int = Field(
        16,
        ge=1,
        le=65_536,
        description="Sequences per micro-batch over all processes, split evenly across them: the same config trains "
        "on the same batches with 1 process or N (it must be a multiple of N).",
    )
    seq_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimiser step.")
    max_steps: int | None = Field(
        50, ge=1, le=10_000_000, description="Budget in optimiser steps (set this or max_tokens, not both)."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=10**15, description="Budget in training tokens over all processes (instead of max_steps)."
    )
    warm_start: Literal["never", "on_new_data"] = Field(
        "on_new_data",
        description="on_new_data: when the latest registered supernet has this architecture but was trained on "
        "other data (a retrain), start from its weights and tokenizer; never: always from scratch.",
    )
    warm_start_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Steps of continued pre-training when warm-starting (None: max_steps)."
    )
    precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate mixed precision: `no` (fp32, CPU), `bf16` (GPU)."
    )
    log_interval: int = Field(10, ge=1, le=1_000_000, description="Steps between train-metric logs.")
    eval_interval: int = Field(50, ge=1, le=1_000_000, description="Steps between validations of the panel.")
    eval_batches: int = Field(4, ge=1, le=10_000, description="Validation batches per evaluated sub-model.")
    eval_panel_size: int = Field(
        2, ge=0, le=64, description="Sub-models validated between the smallest and the largest."
    )
    checkpoint_interval: int = Field(
        50, ge=1, le=1_000_000, description="Steps between resumable checkpoints (accelerate save_state)."
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Newest checkpoints kept on disk.")
    rerank_interval: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Steps between re-measuring layer/expert importance on training batches, so the sandwich's "
        "`smallest` and nested sampling follow the current importance order (None: keep the identity order).",
    )
    rerank_batches: int = Field(4, ge=1, le=10_000, description="Training batches per importance re-ranking.")
    peak_tflops: float | None = Field(
        None, gt=0, le=100_000, description="Device peak for MFU; default: known GPU bf16 peak or measured CPU."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of weights, batches and sub-model sampling.")
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig,
        description="Processes that train (accelerate launch); not part of the run's identity: the batches are the "
        "same with any process count.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> PretrainConfig:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        try:
            self.elastic.check_fits(self.model)
        except ValueError as error:
            raise ValueError(f"elastic: {error}") from error
        if self.max_steps is not None and 1 < self.max_steps <= self.optim.warmup_steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be < max_steps={self.max_steps}")
        return self

    def tokens_per_step(self) -> int:
        """Training tokens per optimiser step over all processes."""
        return self.batch_size * self.seq_len * self.grad_accum

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.max_tokens / self.tokens_per_step()))  # type: ignore[operator]

    def rows_of_process(self, num_processes: int, process_index: int) -> slice:
        """This process's share of every micro-batch; a clear error when the batch does not split evenly."""
        if self.batch_size % num_processes:
            raise ValueError(
                f"pretrain.batch_size={self.batch_size} must be a multiple of the {num_processes} processes "
                "(it is the batch over all of them)"
            )
        share = self.batch_size // num_processes
        return slice(process_index * share, (process_index + 1) * share)

    def identity_exclude(self) -> dict[str, Any]:
        """What a run's identity leaves out: how it is launched, and settings added after runs were saved while
        they hold the value that reproduces the earlier behaviour (LATER_DEFAULTS), so that those runs'
        checkpoints, caches and tags stay valid."""
        exclude: dict[str, Any] = {"launch": True}
        for section, fields in LATER_DEFAULTS.items():
            at_default = {name for name, value in fields.items() if getattr(getattr(self, section), name) == value}
            if at_default:
                exclude[section] = at_default
        return exclude

    def config_hash(self, data_fingerprint: str) -> str:
        """Identity of a run: this config on that data. Checkpoints and registry tags carry it."""
        identity = self.model_dump_json(exclude=self.identity_exclude())
        return hashlib.sha256((identity + data_fingerprint).encode()).hexdigest()


@dataclass(frozen=True)
class PretrainResult:
    checkpoint_dir: Path  # the final supernet (safetensors + config.json)
    steps: int
    resumed_from: int  # 0 for a fresh run
    train_loss: float  # full-model LM loss of the last step
    val_loss: dict[str, float]  # last validation, per panel label
    tokens_per_second: float
    mfu: float
    config_hash: str
    mlflow_run_id: str | None
    loss_curve: Path | None = None


@dataclass
class StepLosses:
    """What one elastic forward/backward produced, for logging and load balancing."""

    full: float = float("nan")
    subnets: list[float] = field(default_factory=list)
    aux: float = 0.0
    z: float = 0.0
    routing: list[RoutingStats] = field(default_factory=list)


def plan_for_step(config: PretrainConfig, model: ElasticMoE, step: int) -> StepPlan:
    """The members `step` trains under the run's elastic recipe (see tasks.elastic_sampling)."""
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


def evaluation_panel(config: PretrainConfig, model: ElasticMoE) -> dict[str, SubnetSpec | None]:
    """The fixed sub-models validated during training: full, largest, smallest and a few in between."""
    importance = model.importance()
    members = sorted(
        config.elastic.enumerate(model.config, importance),
        key=lambda s: (subnet_cost(model.config, s).active_params, s.describe()),
    )
    picks = [members[0]]
    if config.eval_panel_size and len(members) > 2:
        positions = np.linspace(0, len(members) - 1, config.eval_panel_size + 2)[1:-1]
        picks += [members[int(round(p))] for p in positions]
    picks.append(config.elastic.largest(model.config, importance))
    panel: dict[str, SubnetSpec | None] = {"full": None}
    for spec in picks:
        if spec != SubnetSpec.full(model.config):
            panel.setdefault(spec.describe(), spec)
    return panel


@torch.no_grad()
def evaluate_panel(
    model: ElasticMoE,
    panel: dict[str, SubnetSpec | None],
    val_tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean validation LM loss of each sub-model in `panel`, all on the same fixed batches."""
    per_batch = panel_batch_losses(model, panel, val_tokens, batch_size, seq_len, n_batches, device)
    return {label: sum(losses) / len(losses) for label, losses in per_batch.items()}


@torch.no_grad()
def panel_batch_losses(
    model: ElasticMoE,
    panel: dict[str, SubnetSpec | None],
    val_tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Each sub-model's validation LM loss on each of the same fixed batches: differences between members are
    paired, so their noise is the spread of the per-batch differences."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(12345)
    batches = [sample_batch(val_tokens, batch_size, seq_len, rng).to(device) for _ in range(n_batches)]
    losses = {label: [causal_lm_loss(model(b, subnet=spec).logits, b).item() for b in batches]
              for label, spec in panel.items()}  # fmt: skip
    model.train(was_training)
    return losses


def routing_entropy(routing: list[RoutingStats]) -> float:
    """Mean normalised routing entropy NE = -sum p log p / log N over layers (1.0 = perfectly balanced)."""
    values = []
    for stats in routing:
        load = stats.expert_load[stats.kept]
        n = load.numel()
        if n > 1:
            p = load.clamp_min(1e-12)
            values.append(float(-(p * p.log()).sum() / math.log(n)))
    return sum(values) / len(values) if values else 1.0


@torch.no_grad()
def full_model_routing(
    model: ElasticMoE, val_tokens: np.ndarray, config: PretrainConfig, device: torch.device
) -> list[list[float]]:
    """Expert load per MoE layer of the full model on one fixed validation batch (rows of the heatmap)."""
    was_training = model.training
    model.eval()
    batch = sample_batch(val_tokens, config.batch_size, config.seq_len, np.random.default_rng(12345)).to(device)
    rows = [stats.expert_load.tolist() for stats in model(batch).routing]
    model.train(was_training)
    return rows


def metric_key(label: str) -> str:
    return "val_loss/" + label.replace(" ", "_")


class MetricsHistory:
    """Append-only jsonl of logged points that survives kills; truncated to the resumed step on restart."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def curves(self) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
        train = [(r["step"], r["train/loss_full"]) for r in self.records if "train/loss_full" in r]
        val: dict[str, list[tuple[int, float]]] = {}
        for r in self.records:
            for key, value in r.items():
                if key.startswith("val_loss/"):
                    val.setdefault(key.removeprefix("val_loss/"), []).append((r["step"], value))
        return train, val


def prefect_progress(description: str, done: int, total: int) -> UUID | None:
    """A Prefect progress artifact (a bar in the UI) when running inside a Prefect task, else None."""
    if TaskRunContext.get() is None:
        return None
    return create_progress_artifact(100.0 * done / total, description=description)


def run_pretrain(
    config: PretrainConfig,
    data: PreparedData,
    output_dir: str | Path,
    tracking_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    init_label: str = "",
) -> PretrainResult:
    """Train the supernet; resume from the newest checkpoint in `output_dir` if there is one. `init_from` (a saved
    model of this architecture, named `init_label` in the run's identity) gives the starting weights.

    Saves the final supernet to `output_dir/supernet` and, with `tracking_dir`, logs params, metrics and
    the loss-curve PNG to an MLflow run (the same run again after a resume).
    """
    if data.vocab_size > config.model.vocab_size:  # fewer is fine: an imported model may pad its embedding
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({data.vocab_size}): its token ids would not fit the embedding"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_hash = config.config_hash(data.fingerprint + init_label)
    accelerator = Accelerator(
        mixed_precision=config.precision,
        gradient_accumulation_steps=config.grad_accum,
        # sub-models leave layers and experts unused, which DDP must be told about
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rows = config.rows_of_process(accelerator.num_processes, accelerator.process_index)
    if config.sampling.project_conflicts and accelerator.num_processes > 1:
        raise ValueError("pretrain.sampling.project_conflicts needs one process: it edits gradients between backwards")
    set_seed(config.seed)
    model = ElasticMoE(config.model)
    if init_from is not None:
        model.load_state_dict(load_model(init_from).state_dict())  # shapes checked against its config first
    optimizer = build_optimizer(model, config.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    core: ElasticMoE = accelerator.unwrap_model(model)

    checkpoint = latest_checkpoint(output_dir)
    state = load_checkpoint(accelerator, checkpoint, config_hash) if checkpoint else None
    start_step = state.step if state else 0
    if start_step:  # a killed or retried run: say so, in the logs and on the run (the version is tagged too)
        accelerator.print(f"pre-training resumes at step {start_step} of {config.total_steps()} from {checkpoint}")
    logger = None
    if tracking_dir is not None and accelerator.is_main_process:
        run_id = state.mlflow_run_id if state else None
        logger = RunLogger(tracking_dir, run_name="pretrain", run_id=run_id, tags={"stage": "pretrain"})
        logger.log_params({"pretrain": config.model_dump(mode="json"), "data_fingerprint": data.fingerprint})
        logger.set_tags({"config_hash": config_hash, "data_fingerprint": data.fingerprint})
        if start_step:
            logger.set_tags({"resumed_from_step": start_step})
    history = MetricsHistory(output_dir / "metrics.jsonl", start_step)

    total_steps = config.total_steps()
    lr_factor = elastic_lr_schedule(config.optim, config.sampling, total_steps)
    panel = evaluation_panel(config, core)
    eval_shape = (config.batch_size, config.seq_len, config.eval_batches)
    train_tokens, val_tokens = data.split("train"), data.split("val")
    tokens_per_step = config.tokens_per_step()
    peak = device_peak_flops(accelerator.device, config.precision, config.peak_tflops)
    progress = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc="pretrain",
        disable=not accelerator.is_main_process,
    )
    ui_progress = (
        prefect_progress(f"pre-training, {total_steps} steps", start_step, total_steps)
        if accelerator.is_main_process
        else None
    )
    model.train()
    window_start, window_flops, window_tokens = time.perf_counter(), 0.0, 0
    losses, val_loss, tokens_per_second, mfu, grad_norm = StepLosses(), {}, 0.0, 0.0, 0.0
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * lr_factor(step)
        # Per-step generators derived from (seed, step): a resumed run draws exactly what it would have.
        plan = plan_for_step(config, core, step)
        routing: list[RoutingStats] = []
        for micro in range(config.grad_accum):
            # Every process draws the same global batch and trains on its rows, so N processes see exactly what
            # one would. (The trailing 0 keeps the stream of earlier single-process runs: same figures, resumes.)
            rng = np.random.default_rng([config.seed, step, micro, 0])
            batch = sample_batch(train_tokens, config.batch_size, config.seq_len, rng)[rows].to(accelerator.device)
            with accelerator.accumulate(model):
                losses = elastic_forward_backward(model, config, batch, plan, accelerator.backward)
                routing.extend(losses.routing)
                if accelerator.sync_gradients:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if core.config.load_balancing == "bias":
            core.update_routing_bias(mean_over_processes(accelerator, routing))
        if config.rerank_interval and (step + 1) % config.rerank_interval == 0:
            # the same batches on every process, so every rank derives the same order and samples alike
            rng = np.random.default_rng([config.seed, step, 1_000_003])
            calibration = [
                sample_batch(train_tokens, config.batch_size, config.seq_len, rng).to(accelerator.device)
                for _ in range(config.rerank_batches)
            ]
            core.set_importance(measure_importance(core, calibration, config.elastic.expert_ranking).importance())
        window_tokens += tokens_per_step
        window_flops += training_flops(core.config, plan.members, config.seq_len, tokens_per_step)
        done = step + 1
        record: dict = {}
        if done % config.log_interval == 0 or done == total_steps:
            losses = losses_over_processes(accelerator, losses)
            elapsed = time.perf_counter() - window_start
            tokens_per_second, mfu = window_tokens / elapsed, window_flops / elapsed / peak
            record.update(
                {
                    "train/loss_full": losses.full,
                    "train/loss_subnets": float(np.mean(losses.subnets)) if losses.subnets else losses.full,
                    "train/aux_loss": losses.aux,
                    "train/z_loss": losses.z,
                    "train/routing_entropy": routing_entropy([r for r in routing if r.kept.all()]),
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/grad_norm": grad_norm,  # before clipping: above optim.grad_clip, the step was scaled down
                    "perf/tokens_per_second": tokens_per_second,
                    "perf/mfu": mfu,
                }
            )
            progress.set_postfix(loss=f"{losses.full:.3f}", tok_s=f"{tokens_per_second:,.0f}", mfu=f"{mfu:.1%}")
            if ui_progress is not None:
                update_progress_artifact(ui_progress, 100.0 * done / total_steps)
            window_start, window_flops, window_tokens = time.perf_counter(), 0.0, 0
        if done % config.eval_interval == 0 or done == total_steps:
            val_loss = evaluate_panel(core, panel, val_tokens, *eval_shape, accelerator.device)
            record.update({metric_key(label): loss for label, loss in val_loss.items()})
        if record and accelerator.is_main_process:
            history.append({"step": done, **record})
            if logger:
                logger.log_metrics(record, step=done)
        if done % config.checkpoint_interval == 0 or done == total_steps:
            run_id = logger.run_id if logger else (state.mlflow_run_id if state else None)
            save_checkpoint(accelerator, output_dir, TrainerState(done, config_hash, run_id), config.keep_checkpoints)

    if ui_progress is not None:
        update_progress_artifact(ui_progress, 100.0)
    heatmap_rows = full_model_routing(core, val_tokens, config, accelerator.device)
    if not val_loss:  # resumed at the very end: nothing trained, validate what was restored
        val_loss = evaluate_panel(core, panel, val_tokens, *eval_shape, accelerator.device)
    supernet_dir = output_dir / "supernet"
    curve = None
    if accelerator.is_main_process:
        save_model(core, supernet_dir)
        curve = plot_loss_curves(*history.curves(), output_dir / "loss_curve.png")
        heatmap = plot_routing_heatmap(
            heatmap_rows, output_dir / "routing_heatmap.png", "Full-model expert load on validation data"
        )
        if logger:
            logger.log_artifact(curve, "plots")
            logger.log_artifact(heatmap, "plots")
            logger.finish()
    accelerator.wait_for_everyone()
    return PretrainResult(
        checkpoint_dir=supernet_dir,
        steps=total_steps,
        resumed_from=start_step,
        train_loss=losses.full,
        val_loss=val_loss,
        tokens_per_second=tokens_per_second,
        mfu=mfu,
        config_hash=config_hash,
        mlflow_run_id=logger.run_id if logger else None,
        loss_curve=curve,
    )


def register_pretrained(
    result: PretrainResult,
    config: PretrainConfig,
    data: PreparedData,
    tracking_dir: str | Path,
    parent: DownloadedCheckpoint | None = None,
) -> RegisteredVersion:
    """Register the trained supernet as a new `trainonce-supernet` version with its lineage and metrics
    (and the supernet it was warm-started from, if any)."""
    if result.mlflow_run_id is None:
        raise ValueError("register_pretrained needs a run trained with tracking_dir set")
    tokens = config.tokens_per_step() * result.steps + (parent.extra.get("pretrain_tokens", 0) if parent else 0)
    lineage = (
        {"warm_started_from": parent.version.uri, "parent_supernet_version": parent.version.version} if parent else {}
    )
    tags = {
        **lineage,
        "stage": "pretrain",
        "data_fingerprint": data.fingerprint,
        "config_hash": result.config_hash,
        "git_commit": git_commit(),
        "steps": result.steps,
        **({"resumed_from_step": result.resumed_from} if result.resumed_from else {}),
        **{metric_key(label): f"{loss:.4f}" for label, loss in result.val_loss.items()},
    }
    return register_checkpoint(
        tracking_dir,
        result.mlflow_run_id,
        SUPERNET_MODEL,
        result.checkpoint_dir,
        data.tokenizer_path,
        {
            "elastic_space": config.elastic.model_dump(mode="json"),
            "pretrain_tokens": tokens,  # incl. the warm-start parent's: what this supernet has seen
            "chat_format": data.chat_format.model_dump(mode="json"),
        },
        tags,
    )


def latest_supernet(workdir: str | Path) -> DownloadedCheckpoint | None:
    try:
        return download_checkpoint(workdir, f"{SUPERNET_MODEL}/latest")
    except LookupError:  # nothing registered yet
        return None


def warm_start_source(config: PretrainConfig, data: PreparedData, workdir: str | Path) -> DownloadedCheckpoint | None:
    """The latest registered supernet, when `warm_start` is on, it has this architecture and it was trained on
    other data than `data` (a retrain); else None (train from scratch)."""
    if config.warm_start == "never":
        return None
    parent = latest_supernet(workdir)
    if parent is None or version_tags(workdir, parent.version).get("data_fingerprint") == data.fingerprint:
        return None
    return parent if load_config(parent.checkpoint_dir) == config.model else None


def retrain_data_config(data: DataConfig, config: PretrainConfig, workdir: str | Path) -> DataConfig:
    """With warm starts on, prepare data with the latest supernet's tokenizer: a warm start needs the token ids
    the weights were trained on. Unchanged data then gets its old fingerprint back (it hashes the tokenizer
    itself), so every stage stays cached; new data gets a new one."""
    if config.warm_start == "never" or data.tokenizer_file:
        return data
    parent = latest_supernet(workdir)
    if parent is None or load_config(parent.checkpoint_dir) != config.model:
        return data
    return data.model_copy(
        update={"tokenizer_file": str(parent.tokenizer_path), "chat_format": chat_format_of(parent.extra)}
    )


@task(name="retrain-data", retries=2, retry_delay_seconds=[2, 10])
def retrain_data_task(data: DataConfig, config: PretrainConfig, workdir: str) -> DataConfig:
    """The data config this run prepares with (see retrain_data_config); reads the registry, so never cached."""
    return retrain_data_config(data, config, workdir)


@task(name="pretrain", retries=1, retry_delay_seconds=5)
def pretrain_task(config: PretrainConfig, data_dir: str, workdir: str, parent_ref: str | None = None) -> dict:
    """Elastic pre-training (warm-started on new data, see warm_start_source, or continued from `parent_ref`,
    a registered supernet such as an imported checkpoint), then registration; a retry resumes from the last
    checkpoint."""
    data = PreparedData.load(data_dir)
    parent = download_checkpoint(workdir, parent_ref) if parent_ref else warm_start_source(config, data, workdir)
    if parent is not None and config.warm_start_steps is not None:
        config = config.model_copy(update={"max_steps": config.warm_start_steps, "max_tokens": None})
    init_label = parent.version.uri if parent else ""
    output_dir = Path(workdir) / "pretrain" / config.config_hash(data.fingerprint + init_label)[:16]
    init_from = parent.checkpoint_dir if parent else None
    train = run_pretrain if config.launch.in_process else run_pretrain_launched
    result = train(config, data, output_dir, tracking_dir=workdir, init_from=init_from, init_label=init_label)
    version = register_pretrained(result, config, data, workdir, parent)
    return {
        "model_uri": version.uri,
        "version": version.version,
        "run_id": result.mlflow_run_id,
        "checkpoint_dir": str(result.checkpoint_dir),
        "val_loss": result.val_loss,
        "tokens_per_second": result.tokens_per_second,
        "mfu": result.mfu,
        "warm_started_from": init_label or None,
        "resumed_from_step": result.resumed_from,
    }


def run_pretrain_launched(
    config: PretrainConfig,
    data: PreparedData,
    output_dir: str | Path,
    tracking_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    init_label: str = "",
) -> PretrainResult:
    """`run_pretrain` in `config.launch.num_processes` processes (accelerate launch), for a caller that is one
    process (a Prefect task). The job and its result travel as JSON files in `output_dir`."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "pretrain": config.model_dump(mode="json"),
        "data_dir": str(data.directory.resolve()),
        "tracking_dir": str(Path(tracking_dir).resolve()) if tracking_dir is not None else None,
        "init_from": str(init_from) if init_from is not None else None,
        "init_label": init_label,
    }
    (output_dir / "job.json").write_text(json.dumps(job, indent=2))
    (output_dir / "result.json").unlink(missing_ok=True)
    command = config.launch.command("tasks.pretrain", ["--job", str(output_dir / "job.json")])
    run_launched(command, output_dir / "launch.log")
    result = json.loads((output_dir / "result.json").read_text())
    return PretrainResult(**{**result, "checkpoint_dir": Path(result["checkpoint_dir"]),
                             "loss_curve": Path(result["loss_curve"]) if result["loss_curve"] else None})  # fmt: skip


def _run_job(path: Path) -> None:
    """One process of `run_pretrain_launched`: the main process writes the result next to the job."""
    job = json.loads(path.read_text())
    config = PretrainConfig.model_validate(job["pretrain"])
    data = PreparedData.load(job["data_dir"])
    result = run_pretrain(config, data, path.parent, job["tracking_dir"], job["init_from"], job["init_label"])
    if PartialState().is_main_process:
        payload = {**asdict(result), "checkpoint_dir": str(result.checkpoint_dir),
                   "loss_curve": str(result.loss_curve) if result.loss_curve else None}  # fmt: skip
        (path.parent / "result.json").write_text(json.dumps(payload, indent=2))


def main() -> None:
    """Entry point for `accelerate launch -m tasks.pretrain --config tiny` (and for `--job`, see above)."""
    # Imported here: tasks.pipeline_config imports this module for PretrainConfig.
    from tasks.data import prepare_data
    from tasks.pipeline_config import load_pipeline_config, parse_overrides

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--output-dir", default="runs/pretrain", help="checkpoints and the final supernet")
    parser.add_argument("--tracking-dir", default=None, help="MLflow embedded store folder (default: no MLflow)")
    parser.add_argument("--job", type=Path, default=None, help="a job.json written by run_pretrain_launched")
    args = parser.parse_args()
    if args.job is not None:
        _run_job(args.job)
        return
    config = load_pipeline_config(args.config, parse_overrides(args.set))
    state = PartialState()
    with state.main_process_first():  # one process tokenizes; the others then find its dataset on disk
        data = prepare_data(config.data)
    result = run_pretrain(config.pretrain, data, args.output_dir, args.tracking_dir)
    if state.is_main_process:
        print(json.dumps({"steps": result.steps, "resumed_from": result.resumed_from, "val_loss": result.val_loss}))


if __name__ == "__main__":
    main()
