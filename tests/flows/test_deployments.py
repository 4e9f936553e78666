"""prefect.yaml against a real local Prefect server: deploy, run with a process worker through
`prefect deployment run`, cached re-runs, a changed stage re-running downstream only, parameter validation
before a run exists, and the nightly cron schedule."""

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from flows.prefect_local import create_flow_run, local_prefect, run_deployment, wait_for_final_state
from registry.tracking import store_client
from tasks.data.corpus import builtin_shakespeare_files


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server (SQLite) on 127.0.0.1, the `local` process pool, prefect.yaml deployed, one worker; the
    scheduler loops every 2 s so the cron schedule's runs appear during the test."""
    with local_prefect(tmp_path_factory.mktemp("prefect-home"), scheduler_seconds=2) as env:
        yield env


@pytest.mark.slow
def test_manual_runs_cache_rerun_what_changed_and_a_retrain_on_new_data_warm_starts(
    prefect: dict[str, str], tmp_path: Path, small_corpus: Path, pipeline_params
) -> None:
    workdir = tmp_path / "pipeline"
    source = tmp_path / "source"  # a data folder the retrain can grow
    shutil.copytree(small_corpus, source)
    small_corpus = source

    def params(*extra: str) -> dict:
        return pipeline_params(workdir, small_corpus, tmp_path / "data", "deploy.variants=[fp32,int8]", *extra)

    # two runs at once on one fresh workdir, different DPO settings: the second waits for the workdir, then reuses
    # every stage and step they share (one supernet, one sub-model, one SFT model) and re-runs only DPO and deploy
    with ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(lambda extra: run_deployment(prefect, "pipeline/manual", params(*extra)), [(), ("dpo.steps=6",)])
        )
    for done, _ in runs:
        assert done.returncode == 0 and "Completed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    client = store_client(workdir)

    def counts() -> dict[str, int]:
        return {
            n: len(client.search_model_versions(f"name='{n}'"))
            for n in ("trainonce-supernet", "trainonce-subnet", "trainonce-chat-torch", "trainonce-chat")
        }

    assert counts() == {"trainonce-supernet": 1, "trainonce-subnet": 1, "trainonce-chat-torch": 3, "trainonce-chat": 2}
    assert client.get_model_version("trainonce-chat", "2").tags["gate.champion_version"] == "1"
    champion = client.get_model_version_by_alias("trainonce-chat", "champion")
    assert champion.version == "1" or champion.tags["gate.decision"] == "promoted"  # never a rejected version

    registered = counts()
    cached, _ = run_deployment(prefect, "pipeline/manual", params())
    assert cached.returncode == 0 and "Completed" in cached.stdout
    assert counts() == registered  # every stage registers what it computes: nothing new, every stage from the cache

    # new data in the source folder: the nightly retrain warm-starts from supernet 1 and gates a new candidate
    champion = str(client.get_model_version_by_alias("trainonce-chat", "champion").version)
    new_play = builtin_shakespeare_files()[5]
    (source / new_play.name).write_text(new_play.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    retrain_params = params("dpo.steps=6", "pretrain.warm_start_steps=10")
    retrain, _ = run_deployment(prefect, "pipeline/nightly-retrain", retrain_params)
    assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr[-3000:]
    first, second = (client.get_model_version("trainonce-supernet", v).tags for v in ("1", "2"))
    assert second["warm_started_from"] == "models:/trainonce-supernet/1" and second["steps"] == "10"
    assert second["data_fingerprint"] != first["data_fingerprint"]
    candidate = client.get_model_version("trainonce-chat", "3").tags
    assert candidate["parent_supernet"] == "models:/trainonce-supernet/2"
    assert candidate["data_fingerprint"] == second["data_fingerprint"]
    assert candidate["gate.decision"] in ("promoted", "rejected") and candidate["gate.champion_version"] == champion


@pytest.mark.slow
def test_bad_parameter_is_rejected_before_a_run_exists(prefect: dict[str, str]) -> None:
    done, _ = run_deployment(prefect, "pipeline/manual", {"config": {"pretrain": {"max_steps": -3}}})
    assert done.returncode != 0
    assert "config.pretrain.max_steps" in done.stdout + done.stderr


@pytest.mark.slow
def test_unknown_parameter_is_refused_by_the_server(prefect: dict[str, str]) -> None:
    response = create_flow_run(prefect, "pipeline/manual", {"foo": 1})  # was 201: a run with every default
    assert response.status_code == 409, response.text
    assert "'foo' was unexpected" in response.json()["detail"]


@pytest.mark.slow
def test_a_cross_field_rule_fails_the_run_before_any_compute(prefect: dict[str, str]) -> None:
    """JSON Schema cannot say "data.vocab_size must equal pretrain.model.vocab_size": the server accepts the run,
    and the flow's parameter validation fails it as it starts, the fields named in the state message."""
    response = create_flow_run(prefect, "pipeline/manual", {"config": {"data": {"vocab_size": 500}}})
    assert response.status_code == 201, response.text
    state = wait_for_final_state(prefect, response.json()["id"], deadline_seconds=600)
    assert state["type"] == "FAILED"
    assert "pretrain.model.vocab_size=1024 must equal data.vocab_size=500" in state["message"], state


@pytest.mark.slow
def test_a_stage_given_a_model_that_is_not_registered_fails_before_preparing_data(
    prefect: dict[str, str], tmp_path: Path
) -> None:
    """A typo in the model a stage starts from fails the run at once, naming the parameter: not after the corpus is
    tokenized, and not after the retries meant for a store that does not answer."""
    data_dir = tmp_path / "data"
    parameters = {
        "subnet": "trainonce-subnet/9",
        "workdir": str(tmp_path / "pipeline"),
        "data": {"data_dir": str(data_dir)},
    }
    response = create_flow_run(prefect, "align/manual", parameters)
    assert response.status_code == 201, response.text
    state = wait_for_final_state(prefect, response.json()["id"], deadline_seconds=600)
    assert state["type"] == "FAILED"
    assert "subnet: trainonce-subnet/9" in state["message"], state
    assert not data_dir.exists()
    filtered = {"flow_runs": {"id": {"any_": [response.json()["id"]]}}}
    runs = httpx.post(f"{prefect['PREFECT_API_URL']}/task_runs/filter", json=filtered, timeout=30).raise_for_status()
    (resolve,) = [run for run in runs.json() if run["name"].startswith("resolve-model")]
    assert resolve["run_count"] == 1  # no retry: the store answered, the reference was wrong


@pytest.mark.slow
def test_nightly_retrain_is_scheduled_without_overlap(prefect: dict[str, str]) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    async def inspect() -> tuple[object, list]:
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("pipeline/nightly-retrain")
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly-retrain"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))
                ),
            )
            return deployment, runs

    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + 60
    with temporary_settings(
        updates={PREFECT_API_URL: prefect["PREFECT_API_URL"]}
    ):  # this test server, not a temporary one
        while True:
            deployment, runs = asyncio.run(inspect())
            if runs or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.global_concurrency_limit.limit == 1
    assert runs, "the scheduler created no run for the cron schedule"
    assert all(r.expected_start_time.hour == 3 and r.expected_start_time.minute == 0 for r in runs)
