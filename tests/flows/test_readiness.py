"""The one readiness wait: a server that accepts connections but answers late is "not yet", not a failure."""

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows.readiness import http_ok, wait_until_ready


class _SlowStart(BaseHTTPRequestHandler):
    """Answers its first two requests after 1 s (a server busy starting up on a loaded machine), then at once."""

    served = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        type(self).served += 1
        if type(self).served <= 2:
            time.sleep(1.0)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_a_read_timeout_is_retried_until_the_server_answers() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowStart)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/health"
        response = wait_until_ready(http_ok(url, poll_timeout_seconds=0.2), "slow server", deadline_seconds=30)
        assert response.text == "ok"
        assert _SlowStart.served >= 3  # the first polls timed out reading, and were retried
    finally:
        server.shutdown()


def test_a_server_that_exits_fails_at_once_with_its_log() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3 before it was ready\nthe log"):
        wait_until_ready(http_ok("http://127.0.0.1:9/"), "the server", process, log=lambda: "the log")
    assert time.monotonic() - start < 10  # not the deadline


def test_a_server_that_never_answers_times_out_at_the_deadline() -> None:
    with pytest.raises(TimeoutError, match="never was not ready after 1 s"):
        wait_until_ready(http_ok("http://127.0.0.1:9/", 0.1), "never", deadline_seconds=1)
