"""A deployment run that crashes restarts by itself, and a run whose machine died does not stay Running.

Two Prefect automations, created on the server by `make prefect-deploy` (`python -m flows.automations`; it replaces
the ones of the same name, so running it again is safe):

- **unresponsive runs are Crashed**: every flow run of a deployment sends a heartbeat event every
  `HEARTBEAT_SECONDS` (prefect.yaml sets `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` in the runs' environment). A run
  that neither beats nor finishes for `unresponsive_seconds` is marked Crashed: a killed machine or worker and
  its flow process together leave nobody to report, and without this the run would stay Running for good.
- **crashed deployment runs are restarted**: a trainonce deployment run that ends Crashed (its process was
  killed, the worker died, or the rule above) is set back to Scheduled, so a worker runs the same flow run with
  the same parameters again. It resumes: finished stages come from Prefect's cache and pre-training from its
  last checkpoint. `guarded_flow` ends a run that has already crashed `max_restarts` times Failed instead, so
  a run that crashes every time (an OOM kill at the same step) does not loop.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.runtime import flow_run

HEARTBEAT_SECONDS = 30  # Prefect's minimum; prefect.yaml sets it for every deployment run
UNRESPONSIVE = "trainonce: crash unresponsive runs"
RESTART = "trainonce: restart crashed deployment runs"
MAX_RESTARTS_ENV = "TRAINONCE_MAX_CRASH_RESTARTS"
DEFAULT_MAX_RESTARTS = 2
_FINAL_EVENTS = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed")}


def automations(unresponsive_seconds: int = 3 * HEARTBEAT_SECONDS) -> list[AutomationCore]:
    """The two automations (not yet on a server)."""
    if unresponsive_seconds < 2 * HEARTBEAT_SECONDS:
        raise ValueError(
            f"unresponsive_seconds must be >= {2 * HEARTBEAT_SECONDS} (two heartbeats), got {unresponsive_seconds}"
        )
    trainonce_deployment_run = [
        ResourceSpecification({"prefect.resource.role": "deployment"}),
        ResourceSpecification({"prefect.resource.id": "prefect.tag.trainonce"}),
    ]
    flow_runs = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
    return [
        AutomationCore(
            name=UNRESPONSIVE,
            description=f"A flow run with no heartbeat for {unresponsive_seconds} s is marked Crashed.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *_FINAL_EVENTS},
                match=flow_runs,
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=unresponsive_seconds),
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"no heartbeat for {unresponsive_seconds} s: its process is gone",
                )
            ],
        ),
        AutomationCore(
            name=RESTART,
            description="A crashed trainonce deployment run is scheduled again; it resumes from cache and checkpoints.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed"},
                match=flow_runs,
                match_related=trainonce_deployment_run,
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.SCHEDULED,
                    name="Restarting",
                    force=True,
                    message="restarted after a crash: it resumes from its cached stages and last checkpoint",
                )
            ],
        ),
    ]


def apply_automations(unresponsive_seconds: int = 3 * HEARTBEAT_SECONDS) -> list[str]:
    """Create both automations on the server PREFECT_API_URL names, replacing earlier ones of the same names."""
    created = []
    with get_client(sync_client=True) as client:
        for automation in automations(unresponsive_seconds):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
            created.append(automation.name)
    return created


def max_restarts() -> int:
    """How many crashes a deployment run may restart after (env TRAINONCE_MAX_CRASH_RESTARTS, default 2)."""
    value = os.environ.get(MAX_RESTARTS_ENV, str(DEFAULT_MAX_RESTARTS))
    if not value.isdigit():
        raise ValueError(f"{MAX_RESTARTS_ENV} must be a whole number >= 0, got {value!r}")
    return int(value)


def refuse_endless_restarts() -> None:
    """Raise in a deployment run that has crashed more than `max_restarts()` times, so that it ends Failed (which
    the restart automation leaves alone); no-op elsewhere."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.deployment_id is None or run.parent_task_run_id is not None:  # not a deployment run, or a subflow
            return
        crashes = sum(state.type == StateType.CRASHED for state in client.read_flow_run_states(run_id))
    if crashes > max_restarts():
        raise RuntimeError(
            f"this run crashed {crashes} times; not restarting it again ({MAX_RESTARTS_ENV}="
            f"{max_restarts()}): look at the logs of its crashed attempts"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--unresponsive-seconds",
        type=int,
        default=3 * HEARTBEAT_SECONDS,
        help="a run without a heartbeat this long is Crashed (default %(default)s)",
    )
    names = apply_automations(parser.parse_args().unresponsive_seconds)
    print(f"created the automations {', '.join(repr(n) for n in names)}")
