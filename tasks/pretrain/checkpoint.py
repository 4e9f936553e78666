"""Resumable training checkpoints: accelerate's full state (model, optimizer, RNG) plus the step counter, or under
FSDP2 the sharded model and optimizer (tasks.pretrain.sharding; the loop's randomness is drawn from seed and step, so
there is no RNG state to keep).

A checkpoint is written to a private staging folder beside `step_XXXXXXXX` and renamed when complete
(`models.publish`), so a run killed mid-save leaves the previous checkpoint intact and never a half-written one
that looks finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from models.publish import new_staged_dir, publish
from tasks.pretrain.sharding import load_sharded, save_sharded

STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    config_hash: str  # the run this checkpoint belongs to
    mlflow_run_id: str | None
    sharding: str = "ddp"  # pretrain.launch.sharding that wrote it: "ddp" (accelerate's state) or "fsdp2" (shards)


@dataclass(frozen=True)
class ShardedState:
    """The FSDP2-sharded model and its (unwrapped) optimizer, which accelerate's save_state does not cover."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = checkpoint_root(output_dir)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int, sharded: ShardedState | None = None
) -> Path:
    """Save the full training state at `state.step`, keeping the newest `keep` checkpoints. Every process
    writes into the main process's private staging folder, published once all have written."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{state.step:08d}"
    staged = [new_staged_dir(final) if accelerator.is_main_process else None]
    broadcast_object_list(staged)
    if sharded is None:
        accelerator.save_state(str(staged[0]))
    else:
        save_sharded(sharded.model, sharded.optimizer, staged[0])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        written = replace(state, sharding="ddp" if sharded is None else "fsdp2")
        (staged[0] / STATE_FILE).write_text(json.dumps(asdict(written)))
        publish(staged[0], final)
        for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator, checkpoint: Path, config_hash: str, sharded: ShardedState | None = None
) -> TrainerState:
    """Restore model, optimizer and RNG state; refuse a checkpoint written under another config or sharding."""
    state = TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))
    if state.config_hash != config_hash:
        raise ValueError(
            f"{checkpoint} belongs to a run with config hash {state.config_hash[:12]}, not {config_hash[:12]}: "
            "use another output folder (nothing was changed)"
        )
    sharding = "ddp" if sharded is None else "fsdp2"
    if state.sharding != sharding:
        raise ValueError(
            f"{checkpoint} was written with pretrain.launch.sharding={state.sharding}; resume it with the same "
            f"sharding, not {sharding} (nothing was changed)"
        )
    if sharded is None:
        accelerator.load_state(str(checkpoint))
    else:
        load_sharded(sharded.model, sharded.optimizer, checkpoint)
    return state
