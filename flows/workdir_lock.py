"""One run at a time on a workdir: a second pipeline (or stage flow) on the same workdir waits for the first.

Two runs interleaving on one workdir trained the same supernet into the same folder twice, registered it twice,
and moved aliases in an order neither run chose. Waiting is the right answer rather than refusing: when the
first run finishes, every stage the second shares with it is a cache hit (Prefect caches on inputs), so the
identical work is done once and the second run re-runs only what its own parameters change.

The lock is an OS file lock (fcntl/LockFileEx) on `<workdir>/.trainonce.lock`: a killed run releases it with its
process, so a crash never leaves the workdir locked. It guards runs on one machine (a workdir on a network file
system is not a supported way to share work between machines: use a tracking server and separate workdirs).
It is re-entrant within a process, because the pipeline flow calls the stage flows, which take it too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".trainonce.lock"
_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


@contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[None]:
    """Hold the workdir's lock for the block; wait (saying for whom) while another process holds it."""
    folder = Path(workdir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with _locks_guard:  # one lock object per path and process, shared by its threads: re-entrant
        lock = _locks.setdefault(path, FileLock(path, thread_local=False))
    owner = folder / (LOCK_NAME + ".owner")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "another process"
        print(f"{folder} is in use by {holder}: waiting for it to finish (its cached stages are then reused)")
        lock.acquire()
    try:
        if lock.lock_counter == 1:  # the outermost holder says who holds it, for a waiting run's message
            owner.write_text(f"process {os.getpid()}\n")
        yield
    finally:
        lock.release()
