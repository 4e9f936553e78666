"""The stack past one machine, for real: PostgreSQL holding MLflow's store
(`mlflow server --backend-store-uri postgresql://...`, artifacts in S3) and Prefect's database
(`postgresql+asyncpg://...`), all started by `make stack` (flows/local_stack.py).

Two workers run two pipelines on two workdirs against these shared stores at the same time; one of them loses its
worker and its process mid-run and is restarted by the automations. Both complete, every registration and alias
is in PostgreSQL, and nothing is left Running. Then two gates race for `champion` of one model: one decision each,
the second made against the first's result.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg2
import pytest

from flows.local_stack import free_port_block, read_env_file
from flows.postgres_server import PostgresServer, find_bindir
from flows.prefect_local import (
    create_flow_run,
    flow_run_history,
    flow_run_process,
    restarted,
    start_worker,
    stop_gracefully,
    wait_for_final_state,
)
from flows.readiness import free_port, wait_until_ready
from registry.promotion import champion_history
from registry.tracking import RunLogger, store_client

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stack:
    postgres: PostgresServer
    mlflow: str  # the tracking server's URL
    prefect: dict[str, str]  # a worker's environment: PREFECT_API_URL, MLFLOW_TRACKING_URI, S3 credentials


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """`make stack` as a user runs it (flows/local_stack.py: its own PostgreSQL, SeaweedFS, MLflow and Prefect
    servers), on free ports and with no worker: the tests start theirs."""
    folder = Path(tempfile.mkdtemp(prefix="trainonce-stack-"))  # under /tmp: as root, PostgreSQL runs as nobody
    os.chmod(folder, 0o755)
    ports = {"postgres": free_port(), "s3": free_port_block(5), "mlflow": free_port(), "prefect": free_port()}
    options = [f"--{name}-port {port}" for name, port in ports.items()]
    venv = Path(sys.executable).parent.parent
    (stamp,) = venv.glob(".installed-*")  # installed already: `-o` marks the setup stamp up to date
    command = ["make", "-s", "-o", str(stamp), "stack", f"VENV={venv}", f"STAMP={stamp}",
               f"STACK_ARGS=--folder {folder} --workers 0 {' '.join(options)}"]  # fmt: skip
    log = folder / "make-stack.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    postgres = PostgresServer(folder / "postgres", ports["postgres"], find_bindir())
    try:
        started = time.monotonic()
        env_file = wait_until_ready(
            lambda: next(folder.glob("stack.env")), "make stack", process, deadline_seconds=600, log=log.read_text
        )
        print(f"make stack ready in {time.monotonic() - started:.1f} s:\n{log.read_text()}")
        env = {**os.environ, **read_env_file(env_file), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        yield Stack(postgres, env["MLFLOW_TRACKING_URI"], env)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # make and the stack: it stops its servers, PostgreSQL last
        process.wait(timeout=60)
        wait_until_ready(lambda: _stopped(postgres), "the stack to stop", deadline_seconds=120)
        shutil.rmtree(folder, ignore_errors=True)


def _stopped(postgres: PostgresServer) -> None:
    if (postgres.data_dir / "postmaster.pid").exists():
        raise LookupError("PostgreSQL still runs")


def _query(server: PostgresServer, database: str, sql: str, *args) -> list[tuple]:
    """Rows straight from PostgreSQL, as the database's own user."""
    connection = psycopg2.connect(server.uri(database), connect_timeout=30)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()
    finally:
        connection.close()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.slow
def test_two_workers_two_pipelines_on_shared_postgres_stores_and_a_killed_one_resumes(
    stack: Stack, tmp_path: Path, small_corpus: Path, pipeline_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = stack.prefect
    logs = tmp_path / "workers"
    logs.mkdir()
    # One work queue per run, so that each worker runs one of them (as a GPU worker and a CPU worker would).
    workers = {name: start_worker(env, queue=name, log=logs / f"{name}.log") for name in ("a", "b")}
    try:
        # `a` trains long enough to be killed between checkpoints; `b` is the short pipeline.
        long = ("pretrain.max_steps=40", "pretrain.checkpoint_interval=10")
        runs = {
            name: create_flow_run(
                env,
                "pipeline/manual",
                pipeline_params(
                    tmp_path / name, small_corpus, tmp_path / f"data-{name}", "deploy.variants=[fp32]", *extra
                ),
                work_queue=name,
            )
            for name, extra in (("a", long), ("b", ()))
        }
        assert all(r.status_code == 201 for r in runs.values()), [r.text for r in runs.values()]
        ids = {name: r.json()["id"] for name, r in runs.items()}

        checkpoints = tmp_path / "a" / "pretrain"
        wait_until_ready(
            lambda: next(checkpoints.glob("*/checkpoints/step_*")), "run a's first checkpoint", deadline_seconds=900
        )
        process = flow_run_process(env, ids["a"])
        assert _parent(process) == workers["a"].pid
        os.kill(workers["a"].pid, signal.SIGKILL)
        os.kill(process, signal.SIGKILL)  # nobody is left to report it: its run stays Running until noticed
        workers["a"].wait(timeout=60)
        workers["a2"] = start_worker(env, queue="a", log=logs / "a2.log")

        wait_until_ready(lambda: restarted(env, ids["a"]), "run a's restart", deadline_seconds=600, interval_seconds=1)
        states = {name: wait_for_final_state(env, run_id, deadline_seconds=1200) for name, run_id in ids.items()}
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                stop_gracefully(worker)
    histories = {name: [(s["name"], s["message"]) for s in flow_run_history(env, i)] for name, i in ids.items()}
    assert {name: s["type"] for name, s in states.items()} == {"a": "COMPLETED", "b": "COMPLETED"}, histories
    # Crashed by whichever noticed first: the automation (no heartbeat for 90 s) or a flow run of this host that
    # found the run's process gone (flows/stale_runs.py); then restarted, resumed and completed.
    names = [name for name, _ in histories["a"]]
    assert "Crashed" in names and "Restarting" in names, histories["a"]
    assert "Crashed" not in [name for name, _ in histories["b"]], histories["b"]

    # Straight from PostgreSQL: Prefect has nothing Running; MLflow has every registration, no run RUNNING.
    assert _query(stack.postgres, "prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'RUNNING'") == [(0,)]
    assert _query(stack.postgres, "mlflow", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") == [(0,)]
    versions = dict(_query(stack.postgres, "mlflow", "SELECT name, count(*) FROM model_versions GROUP BY name"))
    assert versions == {"trainonce-supernet": 2, "trainonce-subnet": 2, "trainonce-chat-torch": 4, "trainonce-chat": 2}
    aliases = _query(
        stack.postgres, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'trainonce-chat'"
    )
    assert {alias for alias, _ in aliases} == {"candidate", "champion"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow)
    client = store_client(tmp_path)
    supernets = [client.get_model_version("trainonce-supernet", v).tags for v in ("1", "2")]
    resumed = [t for t in supernets if t.get("steps") == "40"]
    assert len(resumed) == 1 and int(resumed[0]["resumed_from_step"]) >= 10  # run a resumed, not started over
    _assert_one_decision_each(tmp_path, "trainonce-chat", ["1", "2"])


def _assert_one_decision_each(workdir: Path, model: str, versions: list[str]) -> None:
    """Every candidate has one recorded decision; the gates ran one after the other (exactly one saw no champion,
    the other was compared with the first's outcome); the history holds the promoted ones in order, and the
    champion is its last."""
    client = store_client(workdir)
    tags = {v: client.get_model_version(model, v).tags for v in versions}
    assert all(t["gate.decision"] in ("promoted", "rejected") for t in tags.values()), tags
    first = [v for v, t in tags.items() if t["gate.champion_version"] == "none"]
    assert len(first) == 1, {v: t["gate.champion_version"] for v, t in tags.items()}
    assert tags[first[0]]["gate.decision"] == "promoted"
    (second,) = set(versions) - set(first)
    assert tags[second]["gate.champion_version"] == first[0]
    promoted = [first[0]] + ([second] if tags[second]["gate.decision"] == "promoted" else [])
    assert champion_history(workdir, model) == promoted
    assert str(client.get_model_version_by_alias(model, "champion").version) == promoted[-1]


GATE = """
import sys
import tempfile
from registry.promotion import GateRules
from tasks.data.config import TaskMixConfig
from tasks.data.corpus import PreparedData
from tasks.deploy.config import EvaluationConfig
from tasks.deploy.task import run_gate

workdir, model, version, data_dir = sys.argv[1:]
evaluation = EvaluationConfig(val_batches=2, batch_size=2, seq_len=32, max_new_tokens=8, speed_prompts=1,
                              speed_new_tokens=4)
decision, _ = run_gate(workdir, model, version, GateRules(), evaluation, TaskMixConfig(test_per_task=2),
                       PreparedData.load(data_dir))
print(decision.summary())
"""


@pytest.mark.slow
def test_two_gates_racing_for_champion_decide_one_after_the_other(
    stack: Stack, chat_packages, small_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes gate two fresh candidates of one model at the same moment, with no champion yet. Unserialised,
    both would read "no champion", both promote, and one `champion_history` write would be lost."""
    from registry.models import register_chat_package
    from serving import CHAT_PYFUNC_CODE

    model = "trainonce-chat-race"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow)
    logger = RunLogger(tmp_path, run_name="export")
    for variant in ("fp32", "int8"):
        register_chat_package(tmp_path, logger.run_id, chat_packages[variant], {"quantization": variant},
                              CHAT_PYFUNC_CODE, name=model)  # fmt: skip
    logger.finish()

    env = {**stack.prefect, "OMP_NUM_THREADS": "1"}
    gates = [
        subprocess.Popen(
            [sys.executable, "-c", GATE, str(tmp_path), model, version, str(small_data.directory)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in ("1", "2")
    ]
    outputs = [gate.communicate(timeout=600) for gate in gates]
    assert [gate.returncode for gate in gates] == [0, 0], [err[-3000:] for _, err in outputs]
    _assert_one_decision_each(tmp_path, model, ["1", "2"])

    limit = httpx.get(f"{stack.prefect['PREFECT_API_URL']}/v2/concurrency_limits/promotion:{model}", timeout=30)
    assert limit.raise_for_status().json()["limit"] == 1 and limit.json()["active_slots"] == 0
