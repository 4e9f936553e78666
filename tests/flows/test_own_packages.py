"""Another project's package with one of our generic top-level names, earlier on the import path, is reported at
once by name (flows/own_packages.py) instead of failing later inside a stage."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _import_flows(pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", "import flows.cli"], cwd=pythonpath, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_shadowing_package_is_named(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text('"""Another project\'s tasks."""\n')
    done = _import_flows(tmp_path)
    assert done.returncode != 0
    assert f"`tasks` resolves to {tmp_path / 'tasks'}, not {REPO / 'tasks'}" in done.stderr, done.stderr


def test_our_own_packages_pass(tmp_path: Path) -> None:
    done = _import_flows(tmp_path)
    assert done.returncode == 0, done.stderr
