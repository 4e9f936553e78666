"""Start-up of the PostgreSQL stack (`make stack`, tests/flows/test_postgres_stack.py), step by step, each on a fresh
database: PostgreSQL's initdb and start, MLflow's and Prefect's schema migrations on it, each server until healthy,
and Prefect's pool, deployments and automations.

    .venv/bin/python benchmarks/postgres_startup.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.local_stack import mlflow_server
from flows.postgres_server import start_postgres
from flows.prefect_local import local_prefect

BIN = Path(sys.executable).parent


def timed(label: str, started: float) -> float:
    seconds = time.monotonic() - started
    print(f"{label:<62} {seconds:6.1f} s")
    return seconds


def main() -> None:
    # Under /tmp: as root the server runs as nobody, who must be able to enter its folder.
    with tempfile.TemporaryDirectory(prefix="trainonce-pg-bench-") as scratch:
        folder = Path(scratch)
        os.chmod(folder, 0o755)
        started = time.monotonic()
        server = start_postgres(folder / "postgres")
        timed("PostgreSQL: initdb, start, postgres-init.sql", started)
        try:
            started = time.monotonic()
            server.stop()
            timed("PostgreSQL: stop", started)
            started = time.monotonic()
            server = start_postgres(folder / "postgres", server.port)
            timed("PostgreSQL: start an existing cluster", started)

            env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
            started = time.monotonic()
            subprocess.run([BIN / "mlflow", "db", "upgrade", server.uri("mlflow")], env=env, check=True,
                           capture_output=True)  # fmt: skip
            timed("MLflow: `mlflow db upgrade` on an empty PostgreSQL database", started)
            started = time.monotonic()
            with mlflow_server(server.uri("mlflow"), (folder / "artifacts").as_uri(), folder / "mlflow", env):
                timed("MLflow: `mlflow server` on the migrated database, to /health", started)

            database = server.uri("prefect", driver="postgresql+asyncpg")
            prefect_env = {**env, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED":
                           "false", "PREFECT_API_DATABASE_CONNECTION_URL": database}  # fmt: skip
            started = time.monotonic()
            subprocess.run([BIN / "prefect", "server", "database", "upgrade", "-y"], env=prefect_env, check=True,
                           capture_output=True)  # fmt: skip
            timed("Prefect: `prefect server database upgrade` on an empty database", started)
            started = time.monotonic()
            with local_prefect(folder / "prefect-home", worker=False, database_url=database):
                timed("Prefect: server to /api/health, pool, deployments, automations", started)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
