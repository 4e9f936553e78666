"""Publishing folders and files that several processes write at once: the loser of the race uses the winner's
copy (or replaces it), a failed write leaves nothing, and leftovers of killed writers go, live writers' stay."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from models.publish import staged_dir, staged_file


def _complete(folder: Path) -> bool:
    return (folder / "done").is_file()


def _write(folder: Path, content: str) -> None:
    (folder / "data").write_text(content)
    (folder / "done").touch()


def _staged_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_loser_of_the_race_uses_the_winners_folder_and_replacing_replaces(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "key"
    with staged_dir(target, keep_existing=_complete) as first, staged_dir(target, keep_existing=_complete) as second:
        assert first != second and first.parent == second.parent == target.parent  # private, beside the target
        _write(first, "first")
        _write(second, "second")
    # `second` finished first (the inner block exits first) and won; `first` found a complete copy and kept it
    assert (target / "data").read_text() == "second" and _staged_entries(target.parent) == []

    (target / "done").unlink()  # an incomplete copy is not kept
    with staged_dir(target, keep_existing=_complete) as third:
        _write(third, "third")
    assert (target / "data").read_text() == "third"
    with staged_dir(target) as fourth:  # not a cache: the newest replaces what is there
        _write(fourth, "fourth")
    assert (target / "data").read_text() == "fourth" and _staged_entries(target.parent) == []


def test_a_failed_write_leaves_nothing_and_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "dataset"
    with staged_dir(target) as folder:
        _write(folder, "good")
    with pytest.raises(RuntimeError, match="interrupted"), staged_dir(target) as folder:
        _write(folder, "half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"), staged_file(tmp_path / "file.json") as path:
        path.write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "data").read_text() == "good" and not (tmp_path / "file.json").exists()
    assert _staged_entries(tmp_path) == []


def test_a_writer_killed_while_deleting_the_copy_it_replaced_leaves_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting the replaced copy is the slow part of a publish: a kill there must not leave no copy at all."""
    target = tmp_path / "export"
    with staged_dir(target) as folder:
        _write(folder, "old")

    def killed(path: Path, ignore_errors: bool = False) -> None:
        raise KeyboardInterrupt(f"killed while deleting {path}")

    monkeypatch.setattr("models.publish.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt), staged_dir(target) as folder:
        _write(folder, "new")
    assert (target / "data").read_text() == "new"


# Stages a folder and a file the way a writer does, reports them, then waits to be killed mid-write.
_WRITER = """
import sys, time
from pathlib import Path
from models.publish import new_staged_dir, staging_path
folder, file = new_staged_dir(Path(sys.argv[1])), staging_path(Path(sys.argv[2]))
(folder / "half").write_text("half")
file.write_text("half")
print(folder, file, flush=True)
time.sleep(120)
"""


def test_leftovers_of_killed_writers_do_not_break_later_writers_and_are_removed(tmp_path: Path) -> None:
    target, file_target = tmp_path / "dataset", tmp_path / "tokenizer.json"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target), str(file_target)], stdout=subprocess.PIPE, text=True
    )
    try:
        folder, file = map(Path, writer.stdout.readline().split())  # type: ignore[union-attr]
        with staged_dir(target) as mine:  # the writer still runs: its folder is left alone
            _write(mine, "mine")
        assert folder.is_dir() and file.is_file()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    elsewhere = f".dataset.tmp-{writer.pid}@another-host.1-{'0' * 16}"  # its pid says nothing here: kept
    (tmp_path / elsewhere).mkdir()
    (tmp_path / "dataset.tmp").mkdir()  # a fixed-name leftover of an older version: ignored

    with staged_file(file_target) as path:  # the next writer in the folder clears what the killed one left
        path.write_text("complete")
    assert not folder.exists() and not file.exists()
    assert file_target.read_text() == "complete" and (target / "data").read_text() == "mine"
    assert _staged_entries(tmp_path) == [elsewhere] and (tmp_path / "dataset.tmp").is_dir()
