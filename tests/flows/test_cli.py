"""The installed `trainonce` console script, run as a user runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _trainonce(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe, "the trainonce console script is installed with the package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands() -> None:
    result = _trainonce("--help")
    assert result.returncode == 0
    for command in ("demo", "prepare-data", "pretrain", "info"):
        assert command in result.stdout


def test_info_prints_the_family_accounting() -> None:
    result = _trainonce("info", "--config", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["supernet", "625,216", "330,304"]
    assert len(lines) == 2 + 3 * 4 * 2  # header + supernet + depths x expert counts x top-k


def test_bad_override_fails_naming_the_field() -> None:
    result = _trainonce("info", "--set", "pretrain.model.top_k=9")
    assert result.returncode != 0
    assert "top_k=9 must be <= the experts of layer 0 (8)" in result.stderr


@pytest.mark.slow
def test_demo_runs_the_whole_job(tmp_path: Path) -> None:
    result = _trainonce(
        "demo",
        "--workdir",
        str(tmp_path / "demo"),
        "--set",
        "pretrain.max_steps=12",
        "--set",
        "pretrain.optim.warmup_steps=2",
        "--set",
        f"data.data_dir={tmp_path / 'data'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "extracted vs masked supernet max |diff| = 0.00e+00" in result.stdout
    assert (tmp_path / "demo" / "supernet" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "smallest" / "config.json").is_file()
