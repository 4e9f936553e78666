"""No Prefect run stays Running after its process is gone.

A SIGKILL (an OOM kill, a killed worker, a power cut) gives Prefect no chance to record anything: the parent flow
run of a deployment is marked Crashed by its worker at best, and its subflow and task runs stay Running for good.
Each of our flow runs therefore records the process that executes it (a `trainonce.process:HOST:PID:START` tag),
and every flow run that starts marks the runs whose recorded process is gone on this host Crashed, with their
running task runs. Runs of other hosts are left to the hosts that can check them.

A restarted run keeps the tag of its dead attempt until its new process claims it. The tag therefore names the
attempt that wrote it (`trainonce.attempt:N`, Prefect's run count): a run waiting for its worker (Pending) or running
an attempt that has not claimed it yet is left alone, or another run of this host starting in that window (a second
worker's pipeline) would crash the restart again.
"""

from __future__ import annotations

import os

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.runtime import flow_run
from prefect.states import Crashed

from registry.tracking import owner_is_gone, process_identity

TAG_PREFIX = "trainonce.process:"
ATTEMPT_PREFIX = "trainonce.attempt:"
_UNFINISHED = [StateType.RUNNING, StateType.PENDING]


def claim_this_run() -> None:
    """Tag the flow run this code executes in with this process (no-op outside a Prefect flow run)."""
    run_id = flow_run.get_id()
    identity = process_identity(os.getpid())
    if run_id is None or identity is None:
        return
    with get_client(sync_client=True) as client:
        tags = [t for t in client.read_flow_run(run_id).tags if not t.startswith((TAG_PREFIX, ATTEMPT_PREFIX))]
        claim = [TAG_PREFIX + identity, f"{ATTEMPT_PREFIX}{flow_run.get_run_count()}"]
        client.update_flow_run(run_id, tags=[*tags, *claim])


def _claimed_by_this_attempt(run: FlowRun) -> bool:
    """Whether `run` is Running the attempt that wrote its process tag (a tag from before attempt tags counts as
    such); False while a restarted run waits for its worker (Pending) or its new attempt has yet to claim it."""
    if run.state_type != StateType.RUNNING:
        return False
    attempt = next((t.removeprefix(ATTEMPT_PREFIX) for t in run.tags if t.startswith(ATTEMPT_PREFIX)), None)
    return attempt is None or attempt == str(run.run_count)


def crash_leftovers_of_earlier_attempts() -> int:
    """In a flow run that runs again after a crash (flows/automations.py restarts it), mark the task runs its dead
    attempt left Running Crashed; returns how many. Among them are the wrappers of its subflows: left Running, Prefect
    would re-attach the new attempt to the old, crashed subflow run instead of starting a fresh one."""
    run_id = flow_run.get_id()
    if run_id is None or flow_run.get_run_count() <= 1:
        return 0
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_UNFINISHED))),
        )
        for task in tasks:
            client.set_task_run_state(task.id, Crashed(message="left by an earlier attempt of this run"), force=True)
    return len(tasks)


def crash_orphaned_runs() -> list[str]:
    """Mark Crashed every unfinished flow run claimed by a process of this host that is gone, and its unfinished
    task runs; returns the flow run ids. (The 200 most recent a call may read: a later run finds any others.)"""
    crashed = []
    with get_client(sync_client=True) as client:
        unfinished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_UNFINISHED)))
        for run in client.read_flow_runs(flow_run_filter=unfinished, sort=FlowRunSort.START_TIME_DESC, limit=200):
            owner = next((t.removeprefix(TAG_PREFIX) for t in run.tags if t.startswith(TAG_PREFIX)), "")
            if not owner_is_gone(owner) or not _claimed_by_this_attempt(run):
                continue
            message = f"its process ({owner}) is gone: killed without a chance to report"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_UNFINISHED))),
            )
            for task in tasks:
                client.set_task_run_state(task.id, Crashed(message=message), force=True)
            crashed.append(str(run.id))
    if crashed:
        print(f"marked {len(crashed)} flow runs Crashed whose processes were gone: {', '.join(crashed)}")
    return crashed
