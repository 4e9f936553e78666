"""What a training loop logs to, without knowing where it goes: the loops (tasks/*/loop.py and friends) take an
`OpenRun` and the stage's task.py hands them one backed by MLflow (registry.tracking.RunLogger), so the algorithm
modules never import the registry and run without a tracking store (benchmarks, tests, a GPU box with torch only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol


class RunTracker(Protocol):
    """One tracked run: parameters once, metrics per step, files, and an end."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self) -> None: ...


# Opens the run to log to: a new one, or (given its id, from a checkpoint) the run a resumed loop logged to before.
OpenRun = Callable[[str | None], RunTracker]
