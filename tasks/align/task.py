"""Alignment stage's Prefect tasks: SFT (tasks.align.sft), DPO (tasks.align.dpo) and GRPO (tasks.align.grpo) of the
extracted sub-model, one task per step, so that a retried or re-run step redoes only itself: each starts from the
version the step before it registered and registers its own in `trainonce-chat-torch` with its lineage. This module
only orchestrates them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from models.chat_format import ChatTokenizer
from models.checkpoint import load_model, save_model
from models.moe import ElasticMoE
from registry.models import RegisteredVersion, download_checkpoint, register_checkpoint
from registry.names import CHAT_TORCH_MODEL, SUBNET_MODEL
from registry.tracking import RunLogger, lineage_tags, stage_run
from tasks.align.config import DPOConfig, GRPOConfig, SFTConfig
from tasks.align.dpo import run_dpo
from tasks.align.grpo import grpo_prompts, run_grpo
from tasks.align.sft import run_sft
from tasks.common.plots import plot_grpo
from tasks.common.stage_results import AlignedStep
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.data.task_mix import Example, corpus_passages, generate_splits, read_preference_jsonl, read_sft_jsonl


def _log_loss_curve(logger: RunLogger, losses: Sequence[float], every: int = 10) -> None:
    for step in range(0, len(losses), every):
        logger.log_metrics({"train/loss": losses[step]}, step=step + 1)


def _accuracy_tags(prefix: str, accuracy: dict[str, float]) -> dict[str, str]:
    return {f"{prefix}_accuracy/{task}": f"{value:.4f}" for task, value in accuracy.items()}


@dataclass(frozen=True)
class _Alignment:
    """What every step reads: the prepared data, its chat tokenizer, and the task mix's train/test split (drawn from
    the corpus's passages the same way in every step, so DPO and GRPO see the split SFT saw)."""

    data: PreparedData
    tokenizer: ChatTokenizer
    passages: list[str]
    train: list[Example]
    test: list[Example]
    workdir: str
    subnet_version: str

    @classmethod
    def load(cls, data_dir: str, task_mix: TaskMixConfig, workdir: str, subnet_version: str) -> _Alignment:
        data = PreparedData.load(data_dir)
        passages = corpus_passages("\n".join(data.documents()))
        train, test = generate_splits(task_mix, passages, data.images)
        return cls(data, data.chat_tokenizer(), passages, train, test, workdir, subnet_version)

    @property
    def folder(self) -> Path:
        """Where the steps save their models and plots: one folder per sub-model version aligned."""
        return Path(self.workdir) / "align" / f"subnet-v{self.subnet_version}"

    def register(self, step: str, model: ElasticMoE, logger: RunLogger, tags: dict[str, str]) -> RegisteredVersion:
        """The model as it stands after `step`, saved and registered in `trainonce-chat-torch` with its lineage."""
        directory = save_model(model, self.folder / step)
        extra = {"stage": step, "chat_format": self.data.chat_format.model_dump(mode="json")}
        parents = {
            "parent_model": f"{SUBNET_MODEL}/{self.subnet_version}",
            "parent_subnet_version": self.subnet_version,
        }
        lineage = lineage_tags(step, self.data.fingerprint, **parents)
        return register_checkpoint(
            self.workdir,
            logger.run_id,
            CHAT_TORCH_MODEL,
            directory,
            self.data.tokenizer_path,
            extra,
            {**lineage, **tags},
        )

    @contextmanager
    def run(self, step: str, config: BaseModel) -> Iterator[RunLogger]:
        """The step's MLflow run (tagged `step`, ended FAILED if the step raises), its config logged as params."""
        with stage_run(self.workdir, step) as logger:
            logger.log_params({step: config.model_dump(mode="json")})
            yield logger

    def start_from(self, previous: AlignedStep) -> ElasticMoE:
        """The model the step before registered (its files in the workdir's registry cache)."""
        return load_model(download_checkpoint(self.workdir, previous.model_uri).checkpoint_dir)


@task(name="sft", retries=1, retry_delay_seconds=5)
def sft_task(sft: SFTConfig, subnet_dir: str, data_dir: str, workdir: str, subnet_version: str) -> AlignedStep:
    """SFT of the extracted sub-model on the task mix (and the user's conversations); registers the result."""
    align = _Alignment.load(data_dir, sft.task_mix, workdir, subnet_version)
    model = load_model(subnet_dir)
    with align.run("sft", sft) as logger:
        extra_conversations = read_sft_jsonl(sft.extra_jsonl) if sft.extra_jsonl else []
        result = run_sft(
            sft, model, align.tokenizer, align.train, align.test, extra_conversations, align.data.training_mix()
        )
        _log_loss_curve(logger, result.losses)
        logger.log_metrics(
            {
                **{f"accuracy_base/{k}": v for k, v in result.accuracy_before.items()},
                **{f"accuracy_sft/{k}": v for k, v in result.accuracy_after.items()},
            },
            step=sft.steps,
        )
        tags = {**_accuracy_tags("base", result.accuracy_before), **_accuracy_tags("sft", result.accuracy_after)}
        version = align.register("sft", model, logger, tags)
    return AlignedStep(
        step="sft", model_uri=version.uri, accuracy=result.accuracy_after, accuracy_before=result.accuracy_before
    )


@task(name="dpo", retries=1, retry_delay_seconds=5)
def dpo_task(
    dpo: DPOConfig, task_mix: TaskMixConfig, sft: AlignedStep, data_dir: str, workdir: str, subnet_version: str
) -> AlignedStep:
    """DPO of the SFT model on its own mistakes on the task mix (and the user's pairs); registers the result."""
    align = _Alignment.load(data_dir, task_mix, workdir, subnet_version)
    model = align.start_from(sft)
    with align.run("dpo", dpo) as logger:
        extra_pairs = read_preference_jsonl(dpo.extra_jsonl) if dpo.extra_jsonl else []
        result = run_dpo(dpo, model, align.tokenizer, align.train, align.test, extra_pairs)
        _log_loss_curve(logger, result.losses)
        held_out = result.held_out
        logger.log_metrics(
            {
                "held_out/reward_accuracy": held_out.reward_accuracy,
                "held_out/chosen_reward": held_out.chosen_reward,
                "held_out/rejected_reward": held_out.rejected_reward,
                "held_out/margin": held_out.margin,
                **{f"pairs/{k}": v for k, v in result.train_pair_kinds.items()},
                **{f"accuracy_dpo/{k}": v for k, v in result.accuracy_after.items()},
            },
            step=dpo.steps,
        )
        tags = {
            "parent_sft_version": sft.version,
            **_accuracy_tags("sft", sft.accuracy),
            **_accuracy_tags("dpo", result.accuracy_after),
            "reward_accuracy": f"{held_out.reward_accuracy:.4f}",
            "pairs": json.dumps(result.train_pair_kinds),
        }
        version = align.register("dpo", model, logger, tags)
    return AlignedStep(
        step="dpo",
        model_uri=version.uri,
        accuracy=result.accuracy_after,
        reward_accuracy=held_out.reward_accuracy,
        pairs=result.train_pair_kinds,
    )


@task(name="grpo", retries=1, retry_delay_seconds=5)
def grpo_task(
    grpo: GRPOConfig, task_mix: TaskMixConfig, dpo: AlignedStep, data_dir: str, workdir: str, subnet_version: str
) -> AlignedStep:
    """GRPO of the DPO model with verifiable rewards on the task mix; registers the result."""
    align = _Alignment.load(data_dir, task_mix, workdir, subnet_version)
    model = align.start_from(dpo)
    with align.run("grpo", grpo) as logger:
        prompts = grpo_prompts(grpo, task_mix, align.passages, align.train, align.test, align.data.images)
        result = run_grpo(grpo, model, align.tokenizer, prompts, align.test, align.data.training_mix())
        for step, metrics in enumerate(result.metrics, start=1):
            logger.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)
        for held in result.held_out:
            logger.log_metrics({f"held_out/{k}": v for k, v in held.items() if k != "step"}, step=int(held["step"]))
        logger.log_artifact(plot_grpo(result.metrics, result.held_out, align.folder / "grpo.png"))
        tags = {
            "parent_dpo_version": dpo.version,
            **_accuracy_tags("dpo", dpo.accuracy),
            **_accuracy_tags("grpo", result.accuracy_after),
        }
        version = align.register("grpo", model, logger, tags)
    return AlignedStep(step="grpo", model_uri=version.uri, accuracy=result.accuracy_after)
