"""One run at a time on a workdir: a second process waits, a killed holder releases, and the pipeline flow's own
stage flows (same process, other threads too) re-enter the lock."""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from flows.workdir_lock import workdir_lock

REPO = Path(__file__).resolve().parents[2]
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.workdir_lock import workdir_lock
    with workdir_lock(sys.argv[1]):
        Path(sys.argv[2]).write_text("held")
        while not Path(sys.argv[3]).exists():
            time.sleep(0.05)
    """
)


def _start_holder(workdir: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    held, release = tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(held), str(release)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not held.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return holder, release


def _acquire_in_thread(workdir: Path) -> tuple[threading.Thread, threading.Event]:
    acquired = threading.Event()

    def take() -> None:
        with workdir_lock(workdir):
            acquired.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, acquired


def test_a_second_process_waits_until_the_first_releases(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "wd"
    holder, release = _start_holder(workdir, tmp_path)
    thread, acquired = _acquire_in_thread(workdir)
    assert not acquired.wait(2.0), "the lock was taken while another process held it"
    release.write_text("go")
    assert holder.wait(timeout=60) == 0
    assert acquired.wait(60.0)
    thread.join(10)
    assert f"is in use by process {holder.pid}: waiting" in capsys.readouterr().out


def test_a_killed_holder_releases_the_workdir(tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    holder, _ = _start_holder(workdir, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    thread, acquired = _acquire_in_thread(workdir)
    assert acquired.wait(60.0), "a SIGKILLed run left the workdir locked"
    thread.join(10)


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with workdir_lock(tmp_path), workdir_lock(tmp_path):  # the pipeline flow, then a stage flow it calls
        thread, acquired = _acquire_in_thread(tmp_path)  # a stage run in another thread of the same process
        assert acquired.wait(10.0)
        thread.join(10)
