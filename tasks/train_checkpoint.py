"""Resumable training checkpoints: accelerate's full state (model, optimizer, RNG) plus the step counter.

A checkpoint is written to `step_XXXXXXXX.tmp` and renamed when complete, so a run killed mid-save leaves
the previous checkpoint intact and never a half-written one that looks finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    config_hash: str  # the run this checkpoint belongs to
    mlflow_run_id: str | None


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = checkpoint_root(output_dir)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int) -> Path:
    """Save the full training state at `state.step`, keeping the newest `keep` checkpoints."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{state.step:08d}"
    tmp = root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, config_hash: str) -> TrainerState:
    """Restore model, optimizer and RNG state; refuse a checkpoint written under another config."""
    state = TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))
    if state.config_hash != config_hash:
        raise ValueError(
            f"{checkpoint} belongs to a run with config hash {state.config_hash[:12]}, not {config_hash[:12]}: "
            "use another output folder (nothing was changed)"
        )
    accelerator.load_state(str(checkpoint))
    return state
