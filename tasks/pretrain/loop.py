"""The pre-training loop: elastic steps under HF accelerate (devices, mixed precision, gradient accumulation,
several processes), the validation panel every `eval_interval` steps, metrics to MLflow, and checkpoints from which
a killed run resumes exactly where it stopped (same data order, same optimizer state, bit-identical weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from models.checkpoint import load_model, save_model
from models.importance import measure_importance
from models.moe import ElasticMoE, RoutingStats
from tasks.common.optim import build_optimizer
from tasks.common.plots import plot_loss_curves, plot_modality_heatmap, plot_routing_heatmap
from tasks.common.throughput import device_peak_flops, training_flops
from tasks.common.tracker import OpenRun
from tasks.data.corpus import PreparedData
from tasks.pretrain.checkpoint import (
    ShardedState,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tasks.pretrain.config import PretrainConfig, PretrainResult
from tasks.pretrain.modality_routing import ModalityRouting, measure_modality_routing, modality_metrics
from tasks.pretrain.sampling import elastic_lr_schedule
from tasks.pretrain.sharding import full_state_dict, shard_model
from tasks.pretrain.step import (
    StepLosses,
    elastic_forward_backward,
    losses_over_processes,
    mean_over_processes,
    plan_for_step,
)
from tasks.pretrain.validation_panel import (
    MetricsHistory,
    evaluate_panel,
    evaluation_panel,
    full_model_routing,
    metric_key,
    routing_entropy,
)

# The re-ranking's calibration batches come from their own stream (seed, step, RERANK_STREAM), apart from the
# training batches' stream, and identical on every process.
RERANK_STREAM = 1_000_003


def run_pretrain(
    config: PretrainConfig,
    data: PreparedData,
    output_dir: str | Path,
    open_run: OpenRun | None = None,
    init_from: str | Path | None = None,
    init_label: str = "",
    on_progress: Callable[[int, int], None] | None = None,
) -> PretrainResult:
    """Train the supernet; resume from the newest checkpoint in `output_dir` if there is one. `init_from` (a saved
    model of this architecture, named `init_label` in the run's identity) gives the starting weights. The main
    process calls `on_progress(done, total)` steps as it goes (the Prefect task draws a bar in the UI with it).

    Saves the final supernet to `output_dir/supernet` and, with `open_run` (registry.tracking.run_opener), logs
    params, metrics and the loss-curve PNG to a tracked run (the same run again after a resume).
    """
    if config.model.image_token_range != data.image_tokens:
        raise ValueError(
            f"pretrain.model.image_token_range={config.model.image_token_range} must be {data.image_tokens}: where "
            "the data put the image codes"
        )
    if data.vocab_size > config.model.vocab_size:  # fewer is fine: an imported model may pad its embedding
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({data.vocab_size}): its token ids would not fit the embedding"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_hash = config.config_hash(data.fingerprint + init_label)
    fsdp = config.launch.sharding == "fsdp2"
    accelerator = Accelerator(
        # under FSDP2 the sharded model computes in its own precision policy (tasks.pretrain.sharding)
        mixed_precision="no" if fsdp else config.precision,
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
    sharded = None
    if fsdp:
        # one process has nothing to shard, but keeps the sharded checkpoint layout (resumable by N processes)
        if accelerator.num_processes > 1:
            shard_model(model, accelerator.device, config.precision)
        else:
            model.to(accelerator.device)
        optimizer = build_optimizer(model, config.optim)
        sharded = ShardedState(model, optimizer)
        optimizer = accelerator.prepare(optimizer)  # not the model: accelerate would wrap it in DDP
    else:
        optimizer = build_optimizer(model, config.optim)
        model, optimizer = accelerator.prepare(model, optimizer)
    core: ElasticMoE = accelerator.unwrap_model(model)

    checkpoint = latest_checkpoint(output_dir)
    state = load_checkpoint(accelerator, checkpoint, config_hash, sharded) if checkpoint else None
    start_step = state.step if state else 0
    if start_step:  # a killed or retried run: say so, in the logs and on the run (the version is tagged too)
        accelerator.print(f"pre-training resumes at step {start_step} of {config.total_steps()} from {checkpoint}")
    logger = None
    if open_run is not None and accelerator.is_main_process:
        logger = open_run(state.mlflow_run_id if state else None)
        logger.log_params({"pretrain": config.model_dump(mode="json"), "data_fingerprint": data.fingerprint})
        logger.set_tags({"config_hash": config_hash, "data_fingerprint": data.fingerprint})
        if start_step:
            logger.set_tags({"resumed_from_step": start_step})
    history = MetricsHistory(output_dir / "metrics.jsonl", start_step) if accelerator.is_main_process else None

    total_steps = config.total_steps()
    lr_factor = elastic_lr_schedule(config.optim, config.sampling, total_steps)
    panel = evaluation_panel(config, core)
    eval_shape = (config.batch_size, config.seq_len, config.eval_batches)
    mix, val_tokens = data.training_mix(), data.split("val")
    image_tokens = data.image_tokens  # with images, also validate on held-out image documents and their routing
    image_val_loss: dict[str, float] = {}
    modality: ModalityRouting | None = None

    def validate_images(image_tokens: tuple[int, int]) -> tuple[dict[str, float], ModalityRouting]:
        """The panel's loss on the held-out image documents, and the full model's routing by modality."""
        losses = evaluate_panel(core, panel, data.image_split("val"), *eval_shape, accelerator.device)
        routing = measure_modality_routing(
            core, data.training_mix("val"), image_tokens, config.batch_size, config.seq_len
        )
        return losses, routing

    tokens_per_step = config.tokens_per_step()
    peak = device_peak_flops(accelerator.device, config.precision, config.peak_tflops)
    progress = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc="pretrain",
        disable=not accelerator.is_main_process,
    )
    report_progress = on_progress if on_progress is not None and accelerator.is_main_process else None
    if report_progress is not None:
        report_progress(start_step, total_steps)
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
            batch = mix.sample(config.batch_size, config.seq_len, rng)[rows].to(accelerator.device)
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
            rng = np.random.default_rng([config.seed, step, RERANK_STREAM])
            calibration = [
                mix.sample(config.batch_size, config.seq_len, rng).to(accelerator.device)
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
            if report_progress is not None:
                report_progress(done, total_steps)
            window_start, window_flops, window_tokens = time.perf_counter(), 0.0, 0
        if done % config.eval_interval == 0 or done == total_steps:
            val_loss = evaluate_panel(core, panel, val_tokens, *eval_shape, accelerator.device)
            record.update({metric_key(label): loss for label, loss in val_loss.items()})
            if image_tokens is not None:
                image_val_loss, modality = validate_images(image_tokens)
                record.update({metric_key(label, "val_image_loss"): loss for label, loss in image_val_loss.items()})
                record.update(modality_metrics(modality))
        if record and history is not None:
            history.append({"step": done, **record})
            if logger:
                logger.log_metrics(record, step=done)
        if done % config.checkpoint_interval == 0 or done == total_steps:
            run_id = logger.run_id if logger else (state.mlflow_run_id if state else None)
            save_checkpoint(
                accelerator, output_dir, TrainerState(done, config_hash, run_id), config.keep_checkpoints, sharded
            )

    if report_progress is not None:
        report_progress(total_steps, total_steps)
    heatmap_rows = full_model_routing(core, val_tokens, config, accelerator.device)
    if not val_loss:  # resumed at the very end: nothing trained, validate what was restored
        val_loss = evaluate_panel(core, panel, val_tokens, *eval_shape, accelerator.device)
    if image_tokens is not None and modality is None:  # the same, for the images (the last step validated them)
        image_val_loss, modality = validate_images(image_tokens)
    supernet_dir = output_dir / "supernet"
    weights = full_state_dict(core) if fsdp else None  # gathered from every process's shards, by all of them
    curve = None
    if history is not None:  # only the main process writes the model and plots
        save_model(core, supernet_dir, weights)
        curve = plot_loss_curves(*history.curves(), output_dir / "loss_curve.png")
        heatmap = plot_routing_heatmap(
            heatmap_rows, output_dir / "routing_heatmap.png", "Full-model expert load on validation data"
        )
        plots = [curve, heatmap]
        if modality is not None:
            title = f"Image share of each expert's tokens (mean modality purity {modality.mean_purity:.3f})"
            plots.append(
                plot_modality_heatmap(
                    modality.image_fraction,
                    modality.layers,
                    output_dir / "routing_modality_heatmap.png",
                    title,
                    modality.image_token_share,
                )
            )
        if logger:
            for plot in plots:
                logger.log_artifact(plot, "plots")
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
        processes=accelerator.num_processes,
        image_val_loss=image_val_loss,
        modality_routing=modality.model_dump() if modality is not None else None,
    )
