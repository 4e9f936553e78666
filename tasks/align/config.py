"""The alignment stage's settings: SFT (`sft:`), DPO (`dpo:`) and GRPO (`grpo:`) in a preset. Each field says what it
does and cites its paper where it has one; the loops that read them are tasks/align/sft.py, dpo.py and grpo.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.sampling import SamplingParams
from tasks.common.optim import fine_tuning_optim
from tasks.common.replay import ReplayConfig
from tasks.common.settings import OPTIM_MOVES, REPLAY_MOVES, refuse_moved_keys, with_defaults
from tasks.data.config import TaskMixConfig
from tasks.data.task_mix import read_preference_jsonl, read_sft_jsonl

# Each stage's optimiser (tasks.common.optim.fine_tuning_optim) and GRPO's replay: what a key left unset means
SFT_OPTIM = fine_tuning_optim(3e-3, 10)
DPO_OPTIM = fine_tuning_optim(5e-5, 10, min_lr_ratio=1.0)  # constant after the warm-up
GRPO_OPTIM = fine_tuning_optim(5e-5, 3, min_lr_ratio=1.0)
GRPO_REPLAY = ReplayConfig(batch_size=2, weight=0.5, seq_len=128)
SFT_REPLAY = ReplayConfig(batch_size=4)  # without replay, SFT erases language modelling (docs/benchmarks.md)


class SFTConfig(BaseModel):
    """Supervised fine-tuning on the task mix (and optional user conversations)."""

    model_config = ConfigDict(extra="forbid")

    task_mix: TaskMixConfig = Field(default_factory=TaskMixConfig, description="Generated instruction tasks.")
    extra_jsonl: str | None = Field(
        None, description='Your own conversations, one {"messages": [...]} per line, trained on with the tasks.'
    )
    steps: int = Field(1500, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(32, ge=1, le=65_536, description="Conversations per batch.")
    max_len: int = Field(128, ge=8, le=1_048_576, description="Longest tokenized conversation; longer are cut.")
    optim: with_defaults(SFT_OPTIM) = Field(
        default_factory=SFT_OPTIM.model_copy,
        description="Optimiser and schedule: AdamW, linear warm-up, cosine to optim.min_lr_ratio of the peak.",
    )
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Generation limit when measuring accuracy.")
    replay: with_defaults(SFT_REPLAY) = Field(
        default_factory=SFT_REPLAY.model_copy,
        description="Pre-training windows (of max_len tokens unless replay.seq_len says) trained on with the LM loss "
        "beside the chat batch, so fine-tuning does not erase language modelling.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        return refuse_moved_keys("sft", data, {**OPTIM_MOVES, **REPLAY_MOVES})

    @model_validator(mode="after")
    def _user_file_parses(self) -> SFTConfig:
        if self.extra_jsonl:  # read now, so a bad file fails before any compute
            read_sft_jsonl(self.extra_jsonl)
        return self


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
    steps: int = Field(60, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Preference pairs per batch.")
    max_len: int = Field(128, ge=8, le=1_048_576, description="Longest tokenized conversation; longer are cut.")
    optim: with_defaults(DPO_OPTIM) = Field(
        default_factory=DPO_OPTIM.model_copy,
        description="Optimiser and schedule: AdamW, linear warm-up, then constant (optim.min_lr_ratio 1).",
    )
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Generation limit for on-policy pairs and accuracy.")
    max_pairs: int | None = Field(
        960,
        ge=1,
        le=10_000_000,
        description="Training prompts (a seeded sample) turned into preference pairs; each costs one greedy "
        "generation, so there is no point in many more than steps x batch_size. None: every training prompt.",
    )
    extra_jsonl: str | None = Field(
        None, description='Your own preference pairs, one {"prompt", "chosen", "rejected"} per line.'
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order and corruptions.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        return refuse_moved_keys("dpo", data, OPTIM_MOVES)

    @model_validator(mode="after")
    def _user_file_parses(self) -> DPOConfig:
        if self.extra_jsonl:  # read now, so a bad file fails before any compute
            read_preference_jsonl(self.extra_jsonl)
        return self


class GRPOConfig(BaseModel):
    """Group Relative Policy Optimization on the instruction tasks' exact-match checkers."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run GRPO after DPO (the last aligned model is the one deployed).")
    steps: int = Field(40, ge=1, le=10_000_000, description="Policy updates (one rollout batch each).")
    prompts_per_step: int = Field(4, ge=1, le=4096, description="Prompts per rollout batch.")
    group_size: int = Field(8, ge=2, le=256, description="Answers sampled per prompt (GRPO's G).")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus of the rollouts.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Longest answer; longer ones are cut and fail.")
    optim: with_defaults(GRPO_OPTIM) = Field(
        default_factory=GRPO_OPTIM.model_copy,
        description="Optimiser and schedule: AdamW, linear warm-up, cosine to optim.min_lr_ratio of the peak (1: "
        "constant after the warm-up).",
    )
    clip_low: float = Field(0.2, gt=0, lt=1, description="Ratio clipped below at 1 - clip_low (PPO's epsilon).")
    clip_high: float = Field(0.2, gt=0, le=10, description="Ratio clipped above at 1 + clip_high (DAPO: 0.28).")
    token_level: bool = Field(False, description="Average the loss over all answer tokens (DAPO), not per answer.")
    scale_advantages: bool = Field(True, description="Divide advantages by the group's std (False: Dr. GRPO).")
    updates_per_rollout: int = Field(1, ge=1, le=64, description="Gradient steps per rollout batch (GRPO's mu).")
    kl_coef: float = Field(0.0, ge=0, le=10, description="Weight of the k3 KL to the starting model (0: none).")
    partial_credit: float = Field(
        0.0,
        ge=0,
        le=0.99,
        description="Weight of partial credit for a wrong answer that ends its turn: the word-level similarity "
        "(difflib ratio) of answer and expected answer, a denser signal on tasks rarely solved (0: exact only).",
    )
    format_reward: float = Field(
        0.0, ge=0, le=1, description="Added when an answer ends its turn within max_new_tokens (0: none)."
    )
    curriculum: bool = Field(True, description="Draw tasks by p(1 - p) of their recent success rate p.")
    dynamic_sampling: int = Field(
        0,
        ge=0,
        le=64,
        description="DAPO's dynamic sampling: groups whose rewards all agree are replaced by new prompts, up to "
        "this many times prompts_per_step drawn per step (0: off; each group kept).",
    )
    replay: with_defaults(GRPO_REPLAY) = Field(
        default_factory=GRPO_REPLAY.model_copy,
        description="Pre-training windows trained on with the LM loss beside the policy loss at every update.",
    )
    pass_k: int = Field(4, ge=1, le=256, description="k of the held-out pass@k (answers sampled per prompt).")
    eval_interval: int = Field(10, ge=1, le=1_000_000, description="Steps between held-out measurements.")
    fresh_prompts_per_task: int = Field(
        400,
        ge=0,
        le=1_000_000,
        description="Prompts per task drawn for GRPO alone, in neither SFT's training split nor the held-out one "
        "(0: SFT's training prompts, whose answers the SFT model has memorised, so their rewards teach little).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of prompt order and sampling.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        return refuse_moved_keys("grpo", data, {**OPTIM_MOVES, **REPLAY_MOVES, "replay_len": "replay.seq_len"})

    def rollout_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p)


GRPO_OFF = GRPOConfig()  # the stage's default: not run
