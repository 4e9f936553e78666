"""The restart cap of flows/automations.py on Prefect's own test server: a deployment run set back to Scheduled after
crashes runs again while it has crashed at most TRAINONCE_MAX_CRASH_RESTARTS times, and ends Failed after that
(which the restart automation leaves alone). The automations themselves act in tests/flows/test_deployment_recovery.py.
"""

from collections.abc import Iterator

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.states import Crashed, Running, Scheduled
from prefect.testing.utilities import prefect_test_harness

from flows.automations import MAX_RESTARTS_ENV, automations, max_restarts, refuse_endless_restarts
from flows.cli import EPHEMERAL_STARTUP_SECONDS


@flow(name="restartable")
def restartable() -> str:
    refuse_endless_restarts()
    return "ran"


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=EPHEMERAL_STARTUP_SECONDS):
        yield


def _run_after_crashes(crashes: int) -> tuple[str, str]:
    """A deployment run of `restartable` that crashed `crashes` times and was scheduled again each time, run once
    more in this process: its final state's type and message."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(restartable)
        deployment_id = client.create_deployment(flow_id=flow_id, name=f"after-{crashes}-crashes")
        run = client.create_flow_run_from_deployment(deployment_id)
        for _ in range(crashes):
            client.set_flow_run_state(run.id, Running(), force=True)
            client.set_flow_run_state(run.id, Crashed(message="killed"), force=True)
            client.set_flow_run_state(run.id, Scheduled(name="Restarting"), force=True)
        state = run_flow(restartable, flow_run=client.read_flow_run(run.id), return_type="state")
    return state.type.value, state.message or ""


def test_a_run_within_the_cap_runs_again_and_one_past_it_fails(harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_RESTARTS_ENV, "2")
    assert _run_after_crashes(2)[0] == "COMPLETED"
    kind, message = _run_after_crashes(3)
    assert kind == "FAILED" and "crashed 3 times" in message, message


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_RESTARTS_ENV, "-1")
    with pytest.raises(ValueError, match=f"{MAX_RESTARTS_ENV} must be a whole number >= 0, got '-1'"):
        max_restarts()
    with pytest.raises(ValueError, match="unresponsive_seconds must be >= 60"):
        automations(unresponsive_seconds=45)
