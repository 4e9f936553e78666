"""Helpers of the settings models: nested settings whose unset keys take the stage's own defaults, and keys that
moved between releases, refused with their new place named."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator

# The flat optimiser and replay keys of the fine-tuning stages, nested as `optim:` and `replay:` since this release.
OPTIM_MOVES = {name: f"optim.{name}" for name in ("lr", "warmup_steps", "min_lr_ratio", "grad_clip")}
REPLAY_MOVES = {"replay_batch_size": "replay.batch_size", "replay_weight": "replay.weight"}


def with_defaults(default: BaseModel) -> Any:
    """The type of a nested settings field whose keys left unset take `default`'s values, not its class's: SFT's
    `optim: {lr: 3e-3}` keeps SFT's weight decay 0 and betas, not pre-training's. Use it with
    `Field(default_factory=default.model_copy)`."""

    def over_default(value: object) -> object:
        return {**default.model_dump(), **value} if isinstance(value, dict) else value

    return Annotated[type(default), BeforeValidator(over_default)]


def refuse_moved_keys(section: str, data: object, moves: dict[str, str]) -> object:
    """A settings section's keys that moved in this release are refused with their new place named, so a preset,
    a `--set` or a deployment parameter written for the old layout fails before any compute and says what to write
    instead."""
    if isinstance(data, dict):
        moved = [key for key in moves if key in data]
        if moved:
            hints = ", ".join(f"{section}.{key} is now {section}.{moves[key]}" for key in moved)
            raise ValueError(f"settings moved: {hints}")
    return data
