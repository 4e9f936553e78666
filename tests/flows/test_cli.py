"""The installed `trainonce` console script, run as a user runs it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


def _trainonce(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = shutil.which("trainonce", path=str(Path(sys.executable).parent))
    assert exe, "the trainonce console script is installed with the package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands() -> None:
    result = _trainonce("--help")  # the installed console script, in its own process
    assert result.returncode == 0
    for command in (
        "pipeline",
        "prepare-data",
        "pretrain",
        "info",
        "serve",
        "promote",
        "rollback",
        "export-hf",
        "import-hf",
        "params",
    ):
        assert command in result.stdout


def test_info_prints_the_family_accounting(capsys: pytest.CaptureFixture[str]) -> None:
    main(["info", "--config", "tiny"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["supernet", "1,399,616", "367,424"]
    assert len(lines) == 2 + 4 * 4 * 2  # header + supernet + depths x expert counts x top-k


def test_bad_override_fails_naming_the_field() -> None:
    with pytest.raises(SystemExit, match=r"top_k=99 must be <= the experts of layer 0 \(16\)"):
        main(["info", "--set", "pretrain.model.top_k=99"])
    with pytest.raises(SystemExit, match=r"data.vocab_size.x: data.vocab_size is a value \(8192\), not a section"):
        main(["info", "--config", "small", "--set", "data.vocab_size.x=1"])  # small sets it: a value, not a section


def test_pretrain_command_trains_registers_and_a_second_run_warm_starts_on_the_same_tokens(
    tmp_path: Path, small_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`trainonce pretrain` (no Prefect) holds the workdir and prepares data as the flows do: a second run on new
    text warm-starts from the first supernet with its tokenizer, not with a BPE of its own."""
    common = ["pretrain", "--config", "tiny", "--workdir", str(tmp_path / "workdir")]
    for setting in ("max_steps=2", "batch_size=4", "seq_len=32", "optim.warmup_steps=1", "eval_interval=2"):
        common += ["--set", f"pretrain.{setting}"]
    main([*common, "--set", f"data.source={small_corpus}", "--set", f"data.data_dir={tmp_path / 'data'}"])
    assert "registered as models:/trainonce-supernet/1" in capsys.readouterr().out
    play = next(small_corpus.iterdir())
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / play.name).write_text(play.read_text()[::-1])
    main([*common, "--set", f"data.source={tmp_path / 'new'}", "--set", f"data.data_dir={tmp_path / 'data'}"])
    out = capsys.readouterr().out
    assert "registered as models:/trainonce-supernet/2 (warm-started from models:/trainonce-supernet/1" in out, out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "70000", r"a TCP port \(0: any free one\) in \[0, 65535\]"),
        ("--poll-seconds", "0", "seconds > 0"),
        ("--threads", "-1", "integer >= 0"),
        ("--max-batch", "0", "integer >= 1"),
    ],
)
def test_serve_refuses_a_bad_option_before_loading_any_model(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The workdir does not exist: a refusal that names the option comes first, before any registry is read."""
    with pytest.raises(SystemExit):
        main(["serve", "--workdir", "/nonexistent/workdir", option, value])
    error = capsys.readouterr().err
    assert f"argument {option}" in error and re.search(message, error), error


def test_pipeline_prefect_settings_reach_prefect_after_it_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect is imported with our stages, before the command knows its workdir: the temporary server's home and
    start-up budget must still be the ones the command chose (os.environ set after the import was ignored), and a
    user's own environment value must still win."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
    )

    from flows.cli import EPHEMERAL_STARTUP_SECONDS, local_prefect_settings

    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    with local_prefect_settings(tmp_path):
        assert PREFECT_HOME.value() == tmp_path / ".prefect"
        assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == EPHEMERAL_STARTUP_SECONDS
        assert get_current_settings().server.analytics_enabled is False
    assert PREFECT_HOME.value() != tmp_path / ".prefect"  # only for the command's duration
