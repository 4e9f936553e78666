"""Publish folders and files that several processes may write at once (two pipeline runs on the same data, two
servers sharing a cache): nobody sees a half-written one, and nobody fails because another got there first.

Each writer stages its output under its own hidden name beside the target,
`.<target name>.tmp-<pid>@<machine>-<random>`, and renames it into place when complete. A rename is atomic,
and renaming a folder onto a non-empty one fails: that failure is how a writer learns it lost the race. A cache
(same name, same content) then keeps the winner's copy; anything else is replaced by the newest. Staged leftovers
of killed writers are removed by the next writer in the same folder on the same machine.

Lives in `models/`, the bottom layer, so `registry/` and `tasks/` can both use it.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel

_STAGED = re.compile(r"^\..+\.tmp-(?P<pid>\d+)@(?P<machine>.+)-[0-9a-f]{16}$")


def _machine() -> str:
    """This host and PID namespace: a writer's pid tells whether it still runs only when read inside both
    (containers with host networking share a hostname but not a process table)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: not Linux
        namespace = 0
    return f"{socket.gethostname()}.{namespace}"


def process_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (it may be a later one reusing the pid)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def staging_path(target: Path) -> Path:
    """A fresh name beside `target`, private to this process (and call), for writing `target`'s content."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}@{_machine()}-{secrets.token_hex(8)}")


def remove_stale(folder: Path) -> None:
    """Delete what writers on this machine staged in `folder` and never published because they were killed.
    Writers still running, and those on other machines sharing the folder, are left alone."""
    machine = _machine()
    for entry in folder.iterdir():
        match = _STAGED.match(entry.name)
        if match is None or match["machine"] != machine or process_running(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # another writer may be removing it too
        else:
            entry.unlink(missing_ok=True)


def new_staged_dir(target: Path) -> Path:
    """An empty staging folder for `target` (its parent created), after removing stale ones beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    staged = staging_path(target)
    staged.mkdir()  # not tempfile.mkdtemp: its 0700 would stay on the published folder, unreadable to others
    return staged


def _replace_always(_: Path) -> bool:
    return False


def publish(staged: Path, target: Path, keep_existing: Callable[[Path], bool] = _replace_always) -> Path:
    """Rename the folder `staged` to `target`; returns `target`.

    When `target` is there already (another writer published first), `keep_existing(target)` decides: True
    (a cache whose name is its content key, and the copy there is complete) deletes ours and keeps theirs;
    False sets theirs aside and publishes ours, so for a moment readers find no `target` at all. A copy set aside
    is deleted only once ours is in place: deleting a large folder is slow, and a writer killed during it must
    not leave neither copy."""
    set_aside: list[Path] = []
    while True:
        try:
            os.rename(staged, target)
            break
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if set_aside and not target.exists():
                    os.rename(set_aside.pop(), target)  # put back the copy this call set aside
                raise
        if keep_existing(target):
            shutil.rmtree(staged)
            break
        aside = staging_path(target)
        try:
            os.rename(target, aside)
        except FileNotFoundError:  # another writer set it aside first; try again
            continue
        set_aside.append(aside)
    for aside in set_aside:
        shutil.rmtree(aside, ignore_errors=True)
    return target


@contextmanager
def staged_dir(target: Path, keep_existing: Callable[[Path], bool] = _replace_always) -> Iterator[Path]:
    """Write `target`'s files into the yielded folder; when the block completes it is published as `target`
    (see `publish`), when it raises it is deleted."""
    staged = new_staged_dir(target)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish(staged, target, keep_existing)


@contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Write `target` at the yielded path (not created); when the block completes it replaces `target`
    atomically (the last writer wins: every copy is complete), when it raises it is deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)
    staged = staging_path(target)
    try:
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, target)


class JsonFile(BaseModel):
    """Settings or numbers that travel as one JSON file beside a model (`FILE_NAME` in its folder), replaced
    atomically like the model's other files."""

    FILE_NAME: ClassVar[str]

    def save(self, directory: str | Path) -> Path:
        target = Path(directory) / self.FILE_NAME
        with staged_file(target) as staged:
            staged.write_text(self.model_dump_json(indent=1))
        return target

    @classmethod
    def load(cls, directory: str | Path) -> Self:
        path = Path(directory) / cls.FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.FILE_NAME} in {directory}")
        return cls.model_validate_json(path.read_text())
