"""No MLflow run stays RUNNING after its process is gone: a process that exits ends its runs FAILED, and one that
is killed outright has them ended KILLED by the next process that logs to the same store."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from registry.tracking import (
    HEARTBEAT_TAG,
    OWNER_TAG,
    STALE_AFTER_SECONDS,
    RunLogger,
    configure_tracking,
    stage_run,
    store_client,
)

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from registry.tracking import RunLogger
    logger = RunLogger(sys.argv[1], run_name="sft")
    print(logger.run_id, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("the stage failed")
    """
)


def _child_run(workdir: Path, how: str, child: str = CHILD) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", child, str(workdir), how],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    return done.stdout.split()[0], done.returncode


def test_a_process_that_exits_ends_its_unfinished_run_failed(tmp_path: Path) -> None:
    run_id, code = _child_run(tmp_path, "raise")
    assert code == 1
    run = store_client(tmp_path).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["trainonce.ended_by"] == "the process exited before the run finished"


def test_a_killed_process_run_is_ended_by_the_next_logger(tmp_path: Path) -> None:
    run_id, code = _child_run(tmp_path, "kill")
    assert code == -signal.SIGKILL
    client = store_client(tmp_path)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing ran on the way out
    alive = RunLogger(tmp_path, run_name="this process")  # a live owner: never ended by the cleanup
    next_one = RunLogger(tmp_path, run_name="next")
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and "was gone" in killed.data.tags["trainonce.ended_by"]
    assert client.get_run(alive.run_id).info.status == "RUNNING"
    assert client.get_run(alive.run_id).data.tags[OWNER_TAG].split(":")[1] == str(os.getpid())
    for logger in (alive, next_one):
        logger.finish()
    assert client.get_run(alive.run_id).info.status == "FINISHED"


def test_a_run_from_another_store_is_not_continued_but_replaced(tmp_path: Path) -> None:
    """A checkpoint written while the workdir used the embedded store names a run a tracking server never saw
    (a resumed pre-training crashed on it): the logger starts a new run instead, and continues one it has."""
    first = RunLogger(tmp_path, run_name="pretrain")
    first.finish()
    foreign = "6255cb81db6042168fae4b5d95cb9cd5"
    fresh = RunLogger(tmp_path, run_name="pretrain", run_id=foreign, tags={"stage": "pretrain"})
    assert fresh.run_id != foreign
    run = store_client(tmp_path).get_run(fresh.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["stage"] == "pretrain"
    fresh.finish()
    continued = RunLogger(tmp_path, run_name="pretrain", run_id=first.run_id)
    assert continued.run_id == first.run_id
    continued.finish()


def test_a_stage_run_ends_with_its_block_and_fails_with_it_in_the_same_process(tmp_path: Path) -> None:
    with stage_run(tmp_path, "export", {"parent_model": "trainonce-chat-torch/3"}) as done:
        done.log_metrics({"val_ppl": 55.0}, step=0)
    try:
        with stage_run(tmp_path, "gate") as failed:
            raise ValueError("the candidate could not be measured")
    except ValueError:
        pass
    client = store_client(tmp_path)
    finished, crashed = client.get_run(done.run_id), client.get_run(failed.run_id)
    assert finished.info.status == "FINISHED" and crashed.info.status == "FAILED"  # not RUNNING until exit
    assert finished.info.run_name == "export" and finished.data.tags["stage"] == "export"
    assert finished.data.tags["parent_model"] == "trainonce-chat-torch/3" and crashed.data.tags["stage"] == "gate"


def test_a_run_whose_owner_on_another_host_stopped_beating_is_ended(tmp_path: Path) -> None:
    """A Kubernetes Job's pod that is killed comes back as a new pod under another hostname, so the process that
    owned its runs cannot be looked up from anywhere: a run of another host whose heartbeat stopped more than
    STALE_AFTER_SECONDS ago is ended KILLED by the next logger; one that beat recently is left alone, and so is one
    with no heartbeat at all (logged before heartbeats existed: nothing tells whether it lives)."""
    client, experiment, now = store_client(tmp_path), configure_tracking(tmp_path), int(time.time())

    def foreign_run(beat: int | None) -> str:
        tags = {OWNER_TAG: "trainonce-pipeline-x7k2p:7:4242", **({HEARTBEAT_TAG: str(beat)} if beat else {})}
        return client.create_run(experiment, tags=tags).info.run_id

    stopped = foreign_run(now - int(STALE_AFTER_SECONDS) - 60)
    beating, unknown = foreign_run(now - 30), foreign_run(None)
    RunLogger(tmp_path, run_name="next").finish()
    ended = client.get_run(stopped)
    assert ended.info.status == "KILLED" and "stopped beating" in ended.data.tags["trainonce.ended_by"]
    assert client.get_run(beating).info.status == "RUNNING" and client.get_run(unknown).info.status == "RUNNING"


BEATING_CHILD = textwrap.dedent(
    """
    import sys, time
    import registry.tracking as tracking
    tracking.HEARTBEAT_SECONDS = 0.2
    logger = tracking.RunLogger(sys.argv[1], run_name="pretrain")
    first = logger.client.get_run(logger.run_id).data.tags[tracking.HEARTBEAT_TAG]
    deadline = time.monotonic() + 120
    while logger.client.get_run(logger.run_id).data.tags[tracking.HEARTBEAT_TAG] == first:
        assert time.monotonic() < deadline, "the heartbeat never advanced"
        time.sleep(0.2)
    print(logger.run_id, flush=True)
    logger.finish()
    """
)


def test_a_live_logger_keeps_beating(tmp_path: Path) -> None:
    """The heartbeat is stamped when the run opens and again every HEARTBEAT_SECONDS while the process lives (a
    child process, so that this one's interval is not changed)."""
    run_id, code = _child_run(tmp_path, "beat", BEATING_CHILD)
    assert code == 0
    assert store_client(tmp_path).get_run(run_id).info.status == "FINISHED"
