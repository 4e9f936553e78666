"""prefect.yaml against a real local Prefect server: deploy, run with a process worker through
`prefect deployment run`, cached re-runs, a changed stage re-running downstream only, parameter validation
before a run exists, and the nightly cron schedule."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from registry.tracking import store_client
from tasks.pipeline_config import load_pipeline_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHORT = [
    "data.vocab_size=400", "pretrain.model.vocab_size=400", "pretrain.max_steps=20", "pretrain.optim.warmup_steps=2",
    "pretrain.eval_interval=10", "extract.distill_compute_fraction=0.3", "sft.steps=20", "sft.tasks.train_per_task=20",
    "sft.tasks.test_per_task=4", "sft.replay_batch_size=2", "dpo.steps=5", "deploy.evaluation.val_batches=2",
    "deploy.evaluation.speed_prompts=1", "deploy.evaluation.speed_new_tokens=8",
]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server (SQLite) on 127.0.0.1, the `local` process pool, prefect.yaml deployed, one worker."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "TRAINONCE_REPO": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and server.poll() is None, "Prefect server did not start"
                time.sleep(0.5)
        for command in (["work-pool", "create", "local", "--type", "process", "--overwrite"],
                        ["--no-prompt", "deploy", "--all"]):  # fmt: skip
            done = subprocess.run([str(BIN / "prefect"), *command], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=180)  # fmt: skip
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        yield env
    finally:
        for process in (worker, server):
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=20)


def _run(
    env: dict[str, str], deployment: str, params: dict, timeout: int = 480
) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, "--params", json.dumps(params),
                           "--watch"], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done, time.monotonic() - start


def _params(tmp_path: Path, small_corpus: Path, workdir: Path, *extra: str) -> dict:
    overrides = [*SHORT, f"data.source={small_corpus}", f"data.data_dir={tmp_path / 'data'}", *extra]
    config = load_pipeline_config("tiny", parse_overrides(overrides))
    return {"config": config.model_dump(mode="json"), "workdir": str(workdir)}


@pytest.mark.slow
def test_manual_pipeline_deployment_caches_and_reruns_only_what_changed(
    prefect: dict[str, str], tmp_path: Path, small_corpus: Path
) -> None:
    workdir = tmp_path / "pipeline"
    cold, cold_seconds = _run(prefect, "pipeline/manual", _params(tmp_path, small_corpus, workdir))
    assert cold.returncode == 0 and "Completed" in cold.stdout, cold.stdout[-3000:] + cold.stderr[-3000:]
    client = store_client(workdir)
    assert str(client.get_model_version_by_alias("trainonce-chat", "champion").version) == "1"

    cached, cached_seconds = _run(prefect, "pipeline/manual", _params(tmp_path, small_corpus, workdir))
    assert cached.returncode == 0 and "Completed" in cached.stdout
    assert cached_seconds < cold_seconds / 2, (cold_seconds, cached_seconds)
    for name in ("trainonce-supernet", "trainonce-subnet", "trainonce-chat-torch", "trainonce-chat"):
        assert len(client.search_model_versions(f"name='{name}'")) == (2 if name == "trainonce-chat-torch" else 1)

    # a changed DPO config re-runs DPO (align) and deploy, not pre-training or extraction
    changed, _ = _run(prefect, "pipeline/manual", _params(tmp_path, small_corpus, workdir, "dpo.steps=6"))
    assert changed.returncode == 0, changed.stdout[-3000:]
    counts = {n: len(client.search_model_versions(f"name='{n}'")) for n in
              ("trainonce-supernet", "trainonce-subnet", "trainonce-chat-torch", "trainonce-chat")}  # fmt: skip
    assert counts == {"trainonce-supernet": 1, "trainonce-subnet": 1, "trainonce-chat-torch": 4, "trainonce-chat": 2}
    assert client.get_model_version("trainonce-chat", "2").tags["gate.champion_version"] == "1"
    print(f"cold {cold_seconds:.1f} s, cached {cached_seconds:.1f} s")


@pytest.mark.slow
def test_bad_parameter_is_rejected_before_a_run_exists(prefect: dict[str, str]) -> None:
    done, _ = _run(prefect, "pipeline/manual", {"config": {"pretrain": {"max_steps": -3}}}, timeout=120)
    assert done.returncode != 0
    assert "config.pretrain.max_steps" in done.stdout + done.stderr


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

    os.environ.update({k: prefect[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    deadline = time.monotonic() + 60
    while True:
        deployment, runs = asyncio.run(inspect())
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.global_concurrency_limit.limit == 1
    assert runs, "the scheduler created no run for the cron schedule"
    assert all(r.expected_start_time.hour == 3 and r.expected_start_time.minute == 0 for r in runs)
