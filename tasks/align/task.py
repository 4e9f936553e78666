"""Alignment stage's Prefect task: SFT (tasks.align.sft), DPO (tasks.align.dpo) and, when enabled, GRPO
(tasks.align.grpo) of the extracted sub-model, each registered in `trainonce-chat-torch` with its lineage; this module
only orchestrates them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from prefect import task

from models.checkpoint import load_model, save_model
from registry.models import RegisteredVersion, register_checkpoint
from registry.names import CHAT_TORCH_MODEL, SUBNET_MODEL
from registry.tracking import RunLogger, lineage_tags, stage_run
from tasks.align.config import GRPO_OFF, DPOConfig, GRPOConfig, SFTConfig
from tasks.align.dpo import run_dpo
from tasks.align.grpo import grpo_prompts, run_grpo
from tasks.align.sft import run_sft
from tasks.common.plots import plot_grpo
from tasks.common.stage_results import AlignedModels
from tasks.data.corpus import PreparedData
from tasks.data.task_mix import corpus_passages, generate_splits, read_preference_jsonl, read_sft_jsonl


def _log_loss_curve(logger: RunLogger, losses: Sequence[float], every: int = 10) -> None:
    for step in range(0, len(losses), every):
        logger.log_metrics({"train/loss": losses[step]}, step=step + 1)


def _accuracy_tags(prefix: str, accuracy: dict[str, float]) -> dict[str, str]:
    return {f"{prefix}_accuracy/{task}": f"{value:.4f}" for task, value in accuracy.items()}


@task(name="align", retries=1, retry_delay_seconds=5)
def align_task(
    sft: SFTConfig,
    dpo: DPOConfig,
    subnet_dir: str,
    data_dir: str,
    workdir: str,
    subnet_version: str,
    grpo: GRPOConfig = GRPO_OFF,
) -> AlignedModels:
    """SFT then DPO (then GRPO, when enabled) of the extracted sub-model; each version registered in
    `trainonce-chat-torch`."""
    data = PreparedData.load(data_dir)
    tokenizer = data.chat_tokenizer()
    model = load_model(subnet_dir)
    passages = corpus_passages("\n".join(data.documents()))
    train, test = generate_splits(sft.task_mix, passages, data.images)
    out_dir = Path(workdir) / "align" / f"subnet-v{subnet_version}"
    parents = {"parent_model": f"{SUBNET_MODEL}/{subnet_version}", "parent_subnet_version": subnet_version}

    def save_and_register(stage: str, logger: RunLogger, tags: dict[str, str]) -> tuple[Path, RegisteredVersion]:
        """The model as it stands after `stage`, saved and registered in `trainonce-chat-torch` with its lineage."""
        directory = save_model(model, out_dir / stage)
        extra = {"stage": stage, "chat_format": data.chat_format.model_dump(mode="json")}
        version = register_checkpoint(
            workdir,
            logger.run_id,
            CHAT_TORCH_MODEL,
            directory,
            data.tokenizer_path,
            extra,
            {**lineage_tags(stage, data.fingerprint, **parents), **tags},
        )
        return directory, version

    with stage_run(workdir, "sft") as sft_logger:
        sft_logger.log_params({"sft": sft.model_dump(mode="json")})
        extra_conversations = read_sft_jsonl(sft.extra_jsonl) if sft.extra_jsonl else []
        extra_pairs = read_preference_jsonl(dpo.extra_jsonl) if dpo.extra_jsonl else []
        sft_result = run_sft(sft, model, tokenizer, train, test, extra_conversations, data.training_mix())
        _log_loss_curve(sft_logger, sft_result.losses)
        sft_logger.log_metrics(
            {
                **{f"accuracy_base/{k}": v for k, v in sft_result.accuracy_before.items()},
                **{f"accuracy_sft/{k}": v for k, v in sft_result.accuracy_after.items()},
            },
            step=sft.steps,
        )
        _, sft_version = save_and_register(
            "sft",
            sft_logger,
            {**_accuracy_tags("base", sft_result.accuracy_before), **_accuracy_tags("sft", sft_result.accuracy_after)},
        )

    with stage_run(workdir, "dpo") as dpo_logger:
        dpo_logger.log_params({"dpo": dpo.model_dump(mode="json")})
        dpo_result = run_dpo(dpo, model, tokenizer, train, test, extra_pairs)
        _log_loss_curve(dpo_logger, dpo_result.losses)
        held_out = dpo_result.held_out
        dpo_logger.log_metrics(
            {
                "held_out/reward_accuracy": held_out.reward_accuracy,
                "held_out/chosen_reward": held_out.chosen_reward,
                "held_out/rejected_reward": held_out.rejected_reward,
                "held_out/margin": held_out.margin,
                **{f"pairs/{k}": v for k, v in dpo_result.train_pair_kinds.items()},
                **{f"accuracy_dpo/{k}": v for k, v in dpo_result.accuracy_after.items()},
            },
            step=dpo.steps,
        )
        final_dir, dpo_version = save_and_register(
            "dpo",
            dpo_logger,
            {
                "parent_sft_version": sft_version.version,
                **_accuracy_tags("sft", sft_result.accuracy_after),
                **_accuracy_tags("dpo", dpo_result.accuracy_after),
                "reward_accuracy": f"{held_out.reward_accuracy:.4f}",
                "pairs": json.dumps(dpo_result.train_pair_kinds),
            },
        )
    accuracy = {"base": sft_result.accuracy_before, "sft": sft_result.accuracy_after, "dpo": dpo_result.accuracy_after}
    grpo_uri = None
    if grpo.enabled:
        with stage_run(workdir, "grpo") as grpo_logger:
            grpo_logger.log_params({"grpo": grpo.model_dump(mode="json")})
            prompts = grpo_prompts(grpo, sft.task_mix, passages, train, test, data.images)
            grpo_result = run_grpo(grpo, model, tokenizer, prompts, test, data.training_mix())
            for step, metrics in enumerate(grpo_result.metrics, start=1):
                grpo_logger.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)
            for held in grpo_result.held_out:
                grpo_logger.log_metrics(
                    {f"held_out/{k}": v for k, v in held.items() if k != "step"}, step=int(held["step"])
                )
            grpo_logger.log_artifact(plot_grpo(grpo_result.metrics, grpo_result.held_out, out_dir / "grpo.png"))
            final_dir, grpo_version = save_and_register(
                "grpo",
                grpo_logger,
                {
                    "parent_dpo_version": dpo_version.version,
                    **_accuracy_tags("dpo", dpo_result.accuracy_after),
                    **_accuracy_tags("grpo", grpo_result.accuracy_after),
                },
            )
        grpo_uri = grpo_version.uri
        accuracy["grpo"] = grpo_result.accuracy_after
    return AlignedModels(
        sft_uri=sft_version.uri,
        dpo_uri=dpo_version.uri,
        grpo_uri=grpo_uri,
        final_dir=str(final_dir),
        parent_model=parents["parent_model"],
        accuracy=accuracy,
        reward_accuracy=held_out.reward_accuracy,
        pairs=dpo_result.train_pair_kinds,
    )
