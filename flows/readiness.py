"""Waiting for a server we started (Prefect, MLflow, S3, `trainonce serve`) to answer.

One wait for every such server, because each hand-written copy caught a different subset of errors: on a busy
machine a server accepts the connection and answers after the poll's own timeout, and a wait that retried only
"connection refused" failed on that read timeout. Here any failed probe is retried until the overall deadline; the
deadline exists for a server that will never start, not to bound how long a slow start may take.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")

# long enough for a server starting on a machine whose cores are all taken by other jobs
DEFAULT_DEADLINE_SECONDS = 300.0


def wait_until_ready(
    probe: Callable[[], T],
    what: str,
    process: subprocess.Popen | None = None,
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
    interval_seconds: float = 0.3,
    log: Callable[[], str] = lambda: "",
) -> T:
    """Call `probe` until it returns; any exception it raises (refused, reset, timed out, 5xx) means "not yet".
    Fails at once if `process` (the server) exits, else after `deadline_seconds`, with the last error chained and
    `log()` (e.g. the tail of the server's log) in the message."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            return probe()
        except Exception as error:  # noqa: BLE001 - every failure of a probe is "not ready yet"
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with code {process.returncode} before it was ready\n{log()}"
                ) from error
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} was not ready after {deadline_seconds:.0f} s\n{log()}") from error
        time.sleep(interval_seconds)


def http_ok(url: str, poll_timeout_seconds: float = 5.0) -> Callable[[], httpx.Response]:
    """A probe: GET `url`, which must answer 2xx within `poll_timeout_seconds` (a slower answer is retried)."""
    return lambda: httpx.get(url, timeout=poll_timeout_seconds).raise_for_status()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server we are about to start."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]
