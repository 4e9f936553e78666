"""A local Prefect deployment stack in one context manager: server (SQLite) on 127.0.0.1, the `local` process
work pool, every deployment of prefect.yaml, and one worker. What `make prefect-server prefect-deploy
prefect-worker` sets up by hand; the deployment tests and benchmarks/prefect_pipeline.py use it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from flows.readiness import free_port, http_ok, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stop_gracefully(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGINT (a Prefect worker needs both to exit)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def start_worker(env: dict[str, str], queue: str | None = None, log: Path | None = None) -> subprocess.Popen:
    """A process worker on the `local` pool, in its own session (a test may kill it alone); `queue`: the one work
    queue it polls (all of the pool's by default); `log`: a file for its output (discarded by default).

    (No `--limit`: Prefect 3.8.8's worker dies with "this borrower is already holding one of this CapacityLimiter's
    tokens" when it fetches a restarted run twice, PrefectHQ/prefect#16806.)"""
    with open(log or os.devnull, "w") as out:
        return subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "local", *(["--work-queue", queue] if queue else [])],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def local_prefect(
    home: Path,
    scheduler_seconds: int = 60,
    worker: bool = True,
    port: int | None = None,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[dict[str, str]]:
    """Yield the environment (PREFECT_API_URL, ...) of a running server + pool + deployments (+ a worker).

    `database_url`: the server's database (`postgresql+asyncpg://...`), else SQLite in `home`; `env`: what the
    worker's flow runs also get (MLFLOW_TRACKING_URI and S3 credentials for shared stores)."""
    home.mkdir(parents=True, exist_ok=True)
    extra = env or {}
    port = port or free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": str(scheduler_seconds),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "TRAINONCE_REPO": str(REPO),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    prefect = str(BIN / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    running_worker = None
    try:
        wait_until_ready(http_ok(f"http://127.0.0.1:{port}/api/health"), "the Prefect server", server)
        for command in (
            ["work-pool", "create", "local", "--type", "process", "--overwrite"],
            ["--no-prompt", "deploy", "--all"],
        ):
            done = subprocess.run([prefect, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"prefect {' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        for module in ("flows.deployment_schema", "flows.automations"):
            subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, check=True, timeout=180)
        running_worker = start_worker(env) if worker else None
        yield env
    finally:
        stop_gracefully(running_worker)
        stop_gracefully(server)


def run_deployment(
    env: dict[str, str], deployment: str, params: dict, timeout: int = 900
) -> tuple[subprocess.CompletedProcess, float]:
    """`prefect deployment run NAME --params JSON --watch`; the finished process and its wall seconds."""
    start = time.monotonic()
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", deployment, "--params", json.dumps(params), "--watch"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - start


def create_flow_run(
    env: dict[str, str], deployment: str, parameters: dict, work_queue: str | None = None
) -> httpx.Response:
    """POST create_flow_run as any API client does (`prefect deployment run` checks names on the client side);
    `work_queue`: a queue of the deployment's pool other than its default (created if missing)."""
    api = env["PREFECT_API_URL"]
    found = httpx.get(f"{api}/deployments/name/{deployment}", timeout=30).raise_for_status().json()
    body: dict = {"parameters": parameters}
    if work_queue:
        queues = f"{api}/work_pools/{found['work_pool_name']}/queues"
        created = httpx.post(queues, json={"name": work_queue}, timeout=30)
        if created.status_code != 409:  # 409: it exists
            created.raise_for_status()
        body["work_queue_name"] = work_queue
    return httpx.post(f"{api}/deployments/{found['id']}/create_flow_run", json=body, timeout=30)


def flow_run_history(env: dict[str, str], run_id: str) -> list[dict]:
    """Every state flow run `run_id` went through (JSON), oldest first."""
    url = f"{env['PREFECT_API_URL']}/flow_run_states/"
    return httpx.get(url, params={"flow_run_id": run_id}, timeout=30).raise_for_status().json()


def restarted(env: dict[str, str], run_id: str) -> bool:
    """True once flow run `run_id` has been restarted (a Restarting state, e.g. by flows/automations.py); a probe
    for wait_until_ready: LookupError before."""
    if not any(s["name"] == "Restarting" for s in flow_run_history(env, run_id)):
        raise LookupError("not restarted yet")
    return True


def flow_run_process(env: dict[str, str], run_id: str) -> int:
    """The pid flow run `run_id`'s process recorded in its `trainonce.process:HOST:PID:START` tag (flows/stale_runs.py);
    LookupError until it has."""
    from flows.stale_runs import TAG_PREFIX

    tags = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).raise_for_status().json()["tags"]
    owner = next((t.removeprefix(TAG_PREFIX) for t in tags if t.startswith(TAG_PREFIX)), None)
    if owner is None:
        raise LookupError(f"flow run {run_id} has no process tag yet")
    return int(owner.split(":")[-2])


def wait_for_final_state(env: dict[str, str], run_id: str, deadline_seconds: float = 900) -> dict:
    """The state (JSON) of flow run `run_id` once it is final; Scheduled, Pending and Running are waited out."""

    def final_state() -> dict:
        state = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30).raise_for_status().json()["state"]
        if state["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            raise LookupError(f"still {state['type']}")
        return state

    return wait_until_ready(
        final_state, f"the end of flow run {run_id}", deadline_seconds=deadline_seconds, interval_seconds=1
    )
