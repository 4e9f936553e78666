"""Processes started together on a fresh workdir create its embedded MLflow store once, without an error
(`sqlite3.OperationalError: duplicate column` / `table ... already exists` when two ran MLflow's migrations at once)."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from registry.tracking import configure_tracking
    Path(sys.argv[3]).write_text("ready")  # imported: ready to race
    while not Path(sys.argv[2]).exists():  # start together
        time.sleep(0.01)
    print(configure_tracking(sys.argv[1]))
    """
)


def test_three_processes_create_one_store(tmp_path: Path) -> None:
    workdir, go = tmp_path / "fresh", tmp_path / "go"
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin"}
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workdir), str(go), str(flag)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 300
    while not all(flag.exists() for flag in ready):
        assert time.monotonic() < deadline and all(c.poll() is None for c in children), "a child never got ready"
        time.sleep(0.05)
    go.write_text("go")
    results = [child.communicate(timeout=300) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, the same id for all
