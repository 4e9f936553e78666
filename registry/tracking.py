"""MLflow tracking: where runs live, and a small logger bound to one run.

Embedded default: a SQLite store `<workdir>/mlflow.db` and artifacts under `<workdir>/mlartifacts`, no
server to start. `MLFLOW_TRACKING_URI` (a server, a database) overrides it with no code change.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from requests import RequestException

from models.publish import process_running
from registry.database import check_database, is_database_uri, masked
from registry.s3 import check_bucket

log = logging.getLogger("trainonce.tracking")

EXPERIMENT = "trainonce"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


def tracking_uri(workdir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded SQLite store in `workdir`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(workdir) / 'mlflow.db').resolve()}"


def store_client(workdir: str | Path) -> MlflowClient:
    """A client bound to the store for `workdir`, for tracking and the model registry alike."""
    uri = tracking_uri(workdir)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def active_store(workdir: str | Path) -> Iterator[str]:
    """Point MLflow's global (fluent) API at the store for `workdir` for the duration of the block.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to the environment, which would silently
    redirect every later store lookup and child process; this restores both afterwards.
    """
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in names}
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def configure_tracking(workdir: str | Path, experiment: str = EXPERIMENT) -> str:
    """Return the id of the experiment in the store for `workdir`, creating store and experiment on first use.

    Artifacts of a new experiment go to `TRAINONCE_ARTIFACT_ROOT` when set (e.g. `s3://bucket/prefix`, written
    by this process with boto3), else for the embedded store to `<workdir>/mlartifacts` and for a server to
    wherever the server says (its --artifacts-destination, proxied).
    """
    Path(workdir).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(workdir)
    embedded = uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI")
    # MLflow creates and migrates a new SQLite store on first use; two processes doing it at once fail ("duplicate
    # column", "table already exists"), so the embedded store's creation is serialised by a file lock.
    with FileLock(Path(workdir) / "mlflow.db.lock") if embedded else contextlib.nullcontext():
        client = store_client(workdir)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        artifacts = os.environ.get("TRAINONCE_ARTIFACT_ROOT") or None
        if artifacts is None and embedded:
            artifacts = (Path(workdir) / "mlartifacts").resolve().as_uri()
        try:
            return client.create_experiment(experiment, artifact_location=artifacts)
        except MlflowException as error:
            # A shared store (a tracking server, a database) where another pipeline created it since the lookup:
            # PostgreSQL's unique name constraint answers the second create with RESOURCE_ALREADY_EXISTS.
            if (
                error.error_code != "RESOURCE_ALREADY_EXISTS"
                or (found := client.get_experiment_by_name(experiment)) is None
            ):
                raise
            return found.experiment_id


class ArtifactStoreError(RuntimeError):
    """The MLflow artifact store cannot be used (missing bucket, rejected credentials, unreachable server)."""


def check_artifact_store(workdir: str | Path) -> str:
    """Fail before any compute when the experiment's artifact store cannot be reached; returns its location.

    `s3://` (the client writes to S3 itself) is checked with boto3; `mlflow-artifacts:` (a tracking server that
    proxies its --artifacts-destination) by listing the experiment's folder through the server, which reaches
    the bucket with the server's credentials. Listing writes nothing. A tracking store that is a database server
    (`postgresql://...`) is checked first: it must accept the connection (TrackingDatabaseError otherwise)."""
    if is_database_uri(tracking_uri(workdir)):
        check_database(tracking_uri(workdir))
    experiment_id = configure_tracking(workdir)
    location = store_client(workdir).get_experiment(experiment_id).artifact_location
    if location.startswith("s3://"):
        check_bucket(location, field="MLflow artifact location")
    elif location.startswith("mlflow-artifacts:"):
        try:
            with active_store(workdir):
                get_artifact_repository(location).list_artifacts()
        except (MlflowException, RequestException) as error:
            detail = getattr(getattr(error, "response", None), "text", "") or str(error)
            raise ArtifactStoreError(
                f"MLflow artifact store {location} (tracking server {tracking_uri(workdir)}) cannot be used: "
                f"{detail[:500]}; check the server's --artifacts-destination bucket and its AWS credentials"
            ) from error
    return location


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested config as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_LENGTH]
    return flat


def git_commit() -> str:
    """The code version: the git commit of this checkout, `unknown` outside one."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Which process owns a RUNNING run: a run whose process is gone is ended by the next one that logs to the store.
OWNER_TAG = "trainonce.owner"
# When the owner last said it was alive (unix seconds, its clock): how a run owned on another machine is told dead,
# since its process cannot be looked up from here (a Kubernetes Job's pod, replaced under a new hostname; a recreated
# container; another node).
HEARTBEAT_TAG = "trainonce.heartbeat"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 900.0  # 15 missed beats: far beyond a store's hiccup or a busy machine's scheduling delay
_open_runs: dict[str, MlflowClient] = {}  # run id -> client: the runs this process has not finished yet
_heartbeat: threading.Thread | None = None


def process_identity(pid: int) -> str | None:
    """`host:pid:start` for a live process (the start time tells a reused pid from the original); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux") or not process_running(pid):
            return None
        return f"{socket.gethostname()}:{pid}:"  # no /proc: liveness only
    start = stat.rpartition(")")[2].split()[19]  # field 22, counted after the parenthesised command name
    return f"{socket.gethostname()}:{pid}:{start}"


def owner_is_gone(owner: str) -> bool:
    """Whether `owner` (a `process_identity`) names a process of this host that no longer runs. False for another
    host's process (it cannot be checked from here) and for a value that is not an identity."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and process_identity(int(pid)) != owner


def orphaned_because(tags: Mapping[str, str], now: float) -> str | None:
    """Why a RUNNING run with these tags has no live owner, or None while it may have one: on this host, its
    process is gone; elsewhere, its heartbeat stopped more than STALE_AFTER_SECONDS ago. A run of another host
    with no heartbeat (written before heartbeats existed) is left alone."""
    owner = tags.get(OWNER_TAG, "")
    if owner.partition(":")[0] == socket.gethostname():
        return f"its process ({owner}) was gone" if owner_is_gone(owner) else None
    beat = tags.get(HEARTBEAT_TAG, "")
    if beat.isdigit() and now - int(beat) > STALE_AFTER_SECONDS:
        return f"its process on another host ({owner}) stopped beating {now - int(beat):.0f} s ago"
    return None


def end_orphaned_runs(workdir: str | Path, experiment_id: str, keep: str | None = None) -> list[str]:
    """End as KILLED every RUNNING run whose owner is gone (SIGKILL, OOM, power loss, a replaced pod:
    `orphaned_because`), except `keep` (the run about to be resumed). Their ids."""
    client = store_client(workdir)
    ended, now = [], time.time()
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        reason = orphaned_because(run.data.tags, now) if run.info.run_id != keep else None
        if reason:
            client.set_tag(run.info.run_id, "trainonce.ended_by", f"cleanup: {reason}")
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def _beat() -> None:
    """Stamp every run this process has open with the time, every HEARTBEAT_SECONDS, for as long as it lives."""
    while True:
        for run_id, client in list(_open_runs.items()):
            with contextlib.suppress(Exception):  # a store that hiccups costs a beat, not the run
                client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
        time.sleep(HEARTBEAT_SECONDS)


def _keep_beating() -> None:
    """Start this process's heartbeat thread, once (a daemon: it dies with the process, which is the point)."""
    global _heartbeat
    if _heartbeat is None or not _heartbeat.is_alive():
        _heartbeat = threading.Thread(target=_beat, name="mlflow-heartbeat", daemon=True)
        _heartbeat.start()


@atexit.register
def _fail_unfinished_runs() -> None:
    """A process that exits (an exception, a Prefect crash, SIGTERM handled by Prefect) ends its open runs as
    FAILED instead of leaving them RUNNING for good."""
    for run_id, client in list(_open_runs.items()):
        with contextlib.suppress(Exception):  # the store may be gone too; the next start cleans up then
            client.set_tag(run_id, "trainonce.ended_by", "the process exited before the run finished")
            client.set_terminated(run_id, status="FAILED")
    _open_runs.clear()


def run_opener(workdir: str | Path, run_name: str, tags: dict | None = None) -> Callable[[str | None], RunLogger]:
    """A training loop's `open_run` (tasks.common.tracker): a RunLogger in `workdir`'s store, continuing the run
    whose id the loop's checkpoint names, or a new one."""
    return lambda run_id: RunLogger(workdir, run_name=run_name, run_id=run_id, tags=tags)


class RunLogger:
    """Logs to one MLflow run by id (no global active run, so it is safe inside Prefect's worker threads).

    The run is tagged with the process that owns it and, every HEARTBEAT_SECONDS, with the time: if the process
    exits before `finish`, the run ends FAILED on the way out; if it is killed outright, the next RunLogger on the
    same store ends it KILLED (on another host, once its heartbeat has stopped for STALE_AFTER_SECONDS)."""

    def __init__(self, workdir: str | Path, run_name: str, run_id: str | None = None, tags: dict | None = None):
        """`run_id`: a run to continue (a resumed stage's), if this store has it; a checkpoint written while the
        workdir used another store (the embedded one, then a tracking server) names a run this one never saw,
        and a new run is started instead."""
        self.experiment_id = configure_tracking(workdir)
        self.client = store_client(workdir)
        if run_id is not None and not self._has_run(run_id):
            uri = tracking_uri(workdir)
            shown = masked(uri) if is_database_uri(uri) else uri
            log.warning("run %s is not in this MLflow store (%s): starting a new run", run_id, shown)
            run_id = None
        end_orphaned_runs(workdir, self.experiment_id, keep=run_id)
        owner = {OWNER_TAG: process_identity(os.getpid()) or "", HEARTBEAT_TAG: str(int(time.time()))}
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**(tags or {}), **owner})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            for key, value in owner.items():
                self.client.set_tag(run_id, key, value)
        self.run_id = run_id
        _open_runs[run_id] = self.client
        _keep_beating()

    def _has_run(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once; on a resumed run, the ones already logged are skipped (MLflow forbids changes)."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flatten(params).items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files, under `artifact_path`."""
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
        _open_runs.pop(self.run_id, None)


def lineage_tags(stage: str, data_fingerprint: str | None = None, **tags: Any) -> dict[str, Any]:
    """What every version a stage registers is tagged with: the stage, the code (git commit) and the data
    (fingerprint) that made it, and the stage's own `tags` (its parents first: `parent_model`, ...)."""
    return {
        **tags,
        "stage": stage,
        **({"data_fingerprint": data_fingerprint} if data_fingerprint is not None else {}),
        "git_commit": git_commit(),
    }


@contextmanager
def stage_run(workdir: str | Path, stage: str, tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
    """The MLflow run of one stage, for a `with` block: named and tagged `stage`, ended FINISHED when the block
    completes and FAILED when it raises (the error goes on), so a stage that fails leaves no run RUNNING behind for
    its retry to wonder about. (A process killed outright cannot end its run: the next RunLogger ends it KILLED.)"""
    logger = RunLogger(workdir, run_name=stage, tags={"stage": stage, **(tags or {})})
    try:
        yield logger
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()


def ui_base_url() -> str:
    """Where the MLflow UI of the active store is: `MLFLOW_UI_URL` when set (a UI behind a proxy, another port),
    else the tracking server itself, else for the embedded store the address `mlflow ui --backend-store-uri
    sqlite:///<workdir>/mlflow.db` serves on by default."""
    if os.environ.get("MLFLOW_UI_URL"):
        return os.environ["MLFLOW_UI_URL"].rstrip("/")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def ui_hint(workdir: str | Path) -> str:
    """How to open the MLflow UI the links of a run's artifacts point at, for the store this workdir uses."""
    uri = tracking_uri(workdir)
    if uri.startswith(("http://", "https://")) or os.environ.get("MLFLOW_UI_URL"):
        return f"MLflow UI: {ui_base_url()}"
    return (
        f"MLflow UI for this store: `mlflow ui --backend-store-uri {uri}` (links below assume it serves on "
        f"{ui_base_url()}; set MLFLOW_UI_URL otherwise)"
    )


def run_link(workdir: str | Path, run_id: str) -> str:
    """A markdown link to an MLflow run, for Prefect artifacts."""
    experiment = store_client(workdir).get_run(run_id).info.experiment_id
    return f"[run {run_id[:8]}]({ui_base_url()}/#/experiments/{experiment}/runs/{run_id})"
