"""The check that a database MLflow is pointed at directly (`MLFLOW_TRACKING_URI=postgresql://...`) answers, before
any compute: MLflow's own store retries a refused connection for minutes and then reports it deep in a stage, with
the URI's password in the traceback. Through an MLflow server the pipeline only speaks HTTP, and the artifact
store check (registry/tracking.py) covers that case."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError


class TrackingDatabaseError(RuntimeError):
    """The tracking store's database refused the connection, or is not there."""


def masked(uri: str) -> str:
    """`uri` with its password replaced by `***`, for messages and logs."""
    return make_url(uri).render_as_string(hide_password=True)


def is_database_uri(uri: str) -> bool:
    """A SQLAlchemy URI of a database server (PostgreSQL, MySQL, MSSQL); SQLite files and servers are not."""
    return uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql")


def check_database(uri: str, timeout_seconds: int = 10) -> None:
    """Connect to `uri` and run `SELECT 1`; TrackingDatabaseError with the URI (password masked) and the server's
    own message (`password authentication failed for user "mlflow"`, `Connection refused`) when that fails."""
    url = make_url(uri)
    connect_args = {"connect_timeout": timeout_seconds} if url.get_backend_name() in ("postgresql", "mysql") else {}
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        detail = " ".join(str(getattr(error, "orig", None) or error).split())
        raise TrackingDatabaseError(f"MLflow tracking database {masked(uri)} cannot be used: {detail}") from error
    except ImportError as error:  # the driver: psycopg2 for postgresql:// (a dependency), others for other databases
        raise TrackingDatabaseError(f"MLflow tracking database {masked(uri)} needs its driver: {error}") from error
    finally:
        engine.dispose()
