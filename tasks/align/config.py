"""The alignment stage's settings: SFT (`sft:`), DPO (`dpo:`) and GRPO (`grpo:`) in a preset. Each field says what it
does and cites its paper where it has one; the loops that read them are tasks/align/sft.py, dpo.py and grpo.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.sampling import SamplingParams
from tasks.data.config import TaskMixConfig
from tasks.data.task_mix import read_preference_jsonl, read_sft_jsonl


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
        0,
        ge=0,
        le=65_536,
        description="Pre-training windows (of max_len tokens) per step trained on with the LM loss beside the "
        "chat batch, so fine-tuning does not erase language modelling; 0 = no replay.",
    )
    replay_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the replay LM loss.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order.")

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
    steps: int = Field(100, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Preference pairs per batch.")
    max_len: int = Field(128, ge=8, le=1_048_576, description="Longest tokenized conversation; longer are cut.")
    lr: float = Field(2e-4, gt=0, le=1, description="Learning rate (AdamW, constant after the warm-up).")
    warmup_steps: int = Field(10, ge=0, le=1_000_000, description="Linear warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm; larger steps are scaled down.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Generation limit for on-policy pairs and accuracy.")
    max_pairs: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Training prompts (a seeded sample) turned into preference pairs; each costs one greedy "
        "generation, so there is no point in many more than steps x batch_size. None: every training prompt.",
    )
    extra_jsonl: str | None = Field(
        None, description='Your own preference pairs, one {"prompt", "chosen", "rejected"} per line.'
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of batch order and corruptions.")

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
    lr: float = Field(5e-5, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(3, ge=0, le=1_000_000, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Final learning rate as a fraction of the peak, reached by cosine decay (1: constant after "
        "the warm-up).",
    )
    grad_clip: float = Field(1.0, gt=0, le=1000, description="Max global gradient norm.")
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
    replay_batch_size: int = Field(2, ge=0, le=4096, description="Pre-training windows replayed per step (0: none).")
    replay_weight: float = Field(0.5, ge=0, le=100, description="Weight of the replayed windows' LM loss.")
    replay_len: int = Field(128, ge=8, le=1_048_576, description="Tokens per replayed window.")
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

    def rollout_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p)


GRPO_OFF = GRPOConfig()  # the stage's default: not run
