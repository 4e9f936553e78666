"""What every flow of ours does before its body runs: end a deployment run that keeps crashing Failed instead of
restarting it again (flows/automations.py), record the process that runs it, take its workdir (waiting for a run
already there), and mark runs whose processes were killed Crashed (flows/stale_runs.py, flows/workdir_lock.py)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from prefect.runtime import flow_run

from flows.automations import refuse_endless_restarts
from flows.stale_runs import claim_this_run, crash_leftovers_of_earlier_attempts, crash_orphaned_runs
from flows.workdir_lock import workdir_lock

P = ParamSpec("P")
R = TypeVar("R")


def run_name(stage: str) -> Callable[[], str]:
    """A flow run name that says what ran and where (`pipeline: runs/exp2`), instead of Prefect's `purple-firefly`;
    the workdir as given (relative to the worker's directory), shortened to its last two folders."""

    def name() -> str:
        workdir = Path(str(flow_run.parameters.get("workdir", "")))
        return f"{stage}: {Path(*workdir.parts[-2:]) if workdir.parts else workdir}"

    return name


def guarded_flow(flow_fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a flow function with a `workdir` parameter; apply under `@flow`. The wrapper carries the function's
    signature with its annotations evaluated, because Prefect resolves string annotations (`from __future__ import
    annotations`) in the wrapper's module, not the flow's."""
    signature = inspect.signature(flow_fn, eval_str=True)

    @functools.wraps(flow_fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        refuse_endless_restarts()
        claim_this_run()  # before waiting: a run killed while it waits is found too
        crash_leftovers_of_earlier_attempts()
        with workdir_lock(bound.arguments["workdir"]):
            crash_orphaned_runs()
            return flow_fn(*args, **kwargs)

    guarded.__signature__ = signature  # type: ignore[attr-defined]
    return guarded
