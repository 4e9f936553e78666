"""The installed `trainonce` console script, run as a user runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _trainonce(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe, "the trainonce console script is installed with the package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands() -> None:
    result = _trainonce("--help")
    assert result.returncode == 0
    for command in ("pipeline", "prepare-data", "pretrain", "info", "serve", "promote", "rollback"):
        assert command in result.stdout


def test_info_prints_the_family_accounting() -> None:
    result = _trainonce("info", "--config", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["supernet", "1,399,616", "367,424"]
    assert len(lines) == 2 + 4 * 4 * 2  # header + supernet + depths x expert counts x top-k


def test_bad_override_fails_naming_the_field() -> None:
    result = _trainonce("info", "--set", "pretrain.model.top_k=99")
    assert result.returncode != 0
    assert "top_k=99 must be <= the experts of layer 0 (16)" in result.stderr
