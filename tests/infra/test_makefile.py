"""The Makefile's Prefect targets on a fresh clone: no `runs/` folder yet."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from flows.readiness import http_ok, wait_until_ready

REPO = Path(__file__).resolve().parents[2]


def test_prefect_server_target_starts_without_a_runs_folder(tmp_path: Path) -> None:
    """`make prefect-server` exited with Error 3 (sqlite3 "unable to open database file") before `runs/` existed."""
    for name in ("Makefile", "pyproject.toml"):  # the Makefile's stamp is keyed by pyproject.toml
        shutil.copy(REPO / name, tmp_path / name)
    venv = Path(sys.executable).parent.parent
    # Installed already. Re-installing from tmp_path would point the shared editable install at a folder without the
    # packages, breaking every later `trainonce` process: name the venv's own stamp (it is keyed by the pyproject.toml
    # it was installed from, which need not be this one) and mark it up to date with `-o`.
    (stamp,) = venv.glob(".installed-*")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        "make",
        "-s",
        "-o",
        str(stamp),
        "prefect-server",
        f"VENV={venv}",
        f"STAMP={stamp}",
        f"PREFECT_PORT={port}",
    ]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(
            http_ok(f"http://127.0.0.1:{port}/api/health"), "make prefect-server", process, log=log.read_text
        )
        assert (tmp_path / "runs" / "prefect").is_dir()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # make and the server it started
            process.wait(timeout=60)
