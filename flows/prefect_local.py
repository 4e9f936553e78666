"""A local Prefect deployment stack in one context manager: server (SQLite) on 127.0.0.1, the `local` process
work pool, every deployment of prefect.yaml, and one worker. What `make prefect-server prefect-deploy
prefect-worker` sets up by hand; the deployment tests and benchmarks/prefect_pipeline.py use it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.readiness import http_ok, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGINT (a Prefect worker needs both to exit)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


@contextmanager
def local_prefect(home: Path, scheduler_seconds: int = 60) -> Iterator[dict[str, str]]:
    """Yield the environment (PREFECT_API_URL, ...) of a running server + pool + deployments + worker."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": str(scheduler_seconds),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1", "TRAINONCE_REPO": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect = str(BIN / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    worker = None
    try:
        wait_until_ready(http_ok(f"http://127.0.0.1:{port}/api/health"), "the Prefect server", server)
        for command in (["work-pool", "create", "local", "--type", "process", "--overwrite"],
                        ["--no-prompt", "deploy", "--all"]):  # fmt: skip
            done = subprocess.run([prefect, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"prefect {' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        subprocess.run([sys.executable, "-m", "flows.deployment_schema"], cwd=REPO, env=env, check=True, timeout=180)
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "local"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        yield env
    finally:
        _stop(worker)
        _stop(server)


def run_deployment(
    env: dict[str, str], deployment: str, params: dict, timeout: int = 900
) -> tuple[subprocess.CompletedProcess, float]:
    """`prefect deployment run NAME --params JSON --watch`; the finished process and its wall seconds."""
    start = time.monotonic()
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, "--params", json.dumps(params),
                           "--watch"], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done, time.monotonic() - start
