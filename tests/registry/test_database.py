"""A tracking store on a PostgreSQL server that refuses the pipeline stops it before any compute, with the URI
(its password masked) and the server's own reason; against a real server (tests/conftest.py `postgres_server`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.postgres_server import PostgresServer
from flows.readiness import free_port
from registry.database import TrackingDatabaseError, check_database
from registry.tracking import check_artifact_store

REPO = Path(__file__).resolve().parents[2]
SECRET = "not-the-password-4711"


def test_a_wrong_password_stops_the_pipeline_before_compute(postgres_server: PostgresServer, tmp_path: Path) -> None:
    uri = f"postgresql://mlflow:{SECRET}@127.0.0.1:{postgres_server.port}/mlflow"
    workdir = tmp_path / "pipeline"
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe
    done = subprocess.run(
        [exe, "pipeline", "--config", "configs/tiny.yaml", "--workdir", str(workdir)],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    masked = f"postgresql://mlflow:***@127.0.0.1:{postgres_server.port}/mlflow"
    assert f"cannot run the pipeline: MLflow tracking database {masked} cannot be used" in output, output[-3000:]
    assert 'password authentication failed for user "mlflow"' in output
    assert SECRET not in output
    assert not (workdir / "pretrain").exists() and not (workdir / "data").exists()  # stopped before any compute


def test_a_server_that_is_not_there_is_named_with_connection_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://mlflow:{SECRET}@127.0.0.1:{port}/mlflow")
    with pytest.raises(TrackingDatabaseError) as raised:
        check_artifact_store(tmp_path)  # the flows' preflight (flows/stages.py checked_workdir)
    message = str(raised.value)
    masked = f"postgresql://mlflow:***@127.0.0.1:{port}/mlflow"
    assert message.startswith(f"MLflow tracking database {masked} cannot be used"), message
    assert "Connection refused" in message and SECRET not in message


def test_the_right_credentials_pass_and_a_wrong_database_is_named(postgres_server: PostgresServer) -> None:
    check_database(postgres_server.uri("mlflow"))
    with pytest.raises(TrackingDatabaseError, match='database "nowhere" does not exist'):
        check_database(postgres_server.uri("mlflow").rsplit("/", 1)[0] + "/nowhere")
