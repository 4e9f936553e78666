"""A deployment run survives its worker, and recovers by itself when its own process dies with nobody watching.

Against a real local Prefect server with the automations of flows/automations.py: a `pipeline/manual` run is
started by worker 1; worker 1 is SIGKILLed during pre-training and the run goes on (its output is not piped
through the worker); a second worker starts; then the run's own process is SIGKILLed. Nobody is left to report
it, so only the missing heartbeats show it: the run is marked Crashed, restarted by the automation, picked up by
worker 2, resumes pre-training from its checkpoint and completes with a champion.
"""

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flows.automations import UNRESPONSIVE
from flows.prefect_local import (
    create_flow_run,
    flow_run_history,
    flow_run_process,
    local_prefect,
    restarted,
    start_worker,
    stop_gracefully,
    wait_for_final_state,
)
from flows.readiness import wait_until_ready
from registry.tracking import store_client
from tasks.pipeline_config import load_pipeline_config, parse_overrides


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server with the pool, the deployments and the automations, and no worker (the test runs them)."""
    with local_prefect(tmp_path_factory.mktemp("prefect-home"), worker=False) as env:
        yield env


def _latest_checkpoint_step(workdir: Path) -> int:
    steps = [
        int(p.name.removeprefix("step_"))
        for p in workdir.glob("pretrain/*/checkpoints/step_*")
        if re.fullmatch(r"step_\d+", p.name)
    ]
    if not steps:
        raise LookupError("no checkpoint yet")
    return max(steps)


@pytest.mark.slow
def test_a_run_outlives_its_worker_and_restarts_by_itself_after_its_process_dies(
    prefect: dict[str, str], tmp_path: Path, small_corpus: Path, short_pipeline: list[str]
) -> None:
    workdir = tmp_path / "pipeline"
    overrides = [
        *short_pipeline,
        "pretrain.max_steps=150",
        "pretrain.checkpoint_interval=10",
        "deploy.variants=[fp32]",
        "deploy.hugging_face=false",
        f"data.source={small_corpus}",
        f"data.data_dir={tmp_path / 'data'}",
    ]
    config = load_pipeline_config("tiny", parse_overrides(overrides))
    first_worker = start_worker(prefect)
    second_worker = None
    try:
        response = create_flow_run(
            prefect, "pipeline/manual", {"config": config.model_dump(mode="json"), "workdir": str(workdir)}
        )
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]
        step = wait_until_ready(
            lambda: _latest_checkpoint_step(workdir), "a pre-training checkpoint", first_worker, deadline_seconds=900
        )
        os.kill(first_worker.pid, signal.SIGKILL)  # a worker restart, or a worker killed for memory
        first_worker.wait(timeout=60)
        later = wait_until_ready(
            lambda: _later_step(workdir, step), "training to go on without its worker", deadline_seconds=300
        )
        assert later > step
        second_worker = start_worker(prefect)
        os.kill(flow_run_process(prefect, run_id), signal.SIGKILL)  # nobody is left to report this one

        # Crashed is final until the restart automation answers it: wait for its Restarting state first (the two
        # are seconds apart on a busy machine, and a poll between them would read the Crashed as the end).
        wait_until_ready(
            lambda: restarted(prefect, run_id), "the automation's restart", deadline_seconds=600, interval_seconds=1
        )
        state = wait_for_final_state(prefect, run_id, deadline_seconds=1200)
        history = flow_run_history(prefect, run_id)
        assert state["type"] == "COMPLETED", [(s["name"], s["message"]) for s in history]
        crashed = [s for s in history if s["type"] == "CRASHED"]
        assert len(crashed) == 1 and "no heartbeat" in crashed[0]["message"], [s["name"] for s in history]
        assert any(s["name"] == "Restarting" for s in history)
        client = store_client(workdir)
        supernet = client.get_model_version("trainonce-supernet", "1")
        assert int(supernet.tags["resumed_from_step"]) >= later  # pre-training resumed, not started over
        assert str(client.get_model_version_by_alias("trainonce-chat", "champion").version) == "1"
        experiment = client.get_experiment_by_name("trainonce").experiment_id
        assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
        automations = (
            httpx.post(f"{prefect['PREFECT_API_URL']}/automations/filter", json={}, timeout=30)
            .raise_for_status()
            .json()
        )
        assert UNRESPONSIVE in {a["name"] for a in automations}
    finally:
        stop_gracefully(second_worker)
        if first_worker.poll() is None:
            first_worker.kill()


def _later_step(workdir: Path, step: int) -> int:
    latest = _latest_checkpoint_step(workdir)
    if latest <= step:
        raise LookupError(f"still at step {step}")
    return latest
