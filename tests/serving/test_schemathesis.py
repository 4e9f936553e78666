"""schemathesis (its CLI, as a user runs it) against the real server's own OpenAPI document: generated requests,
valid and invalid, on every operation, with the model narrowed to the served one (schemathesis_hooks.py) so that
valid ones reach generation. No answer may be a server error, and every answer must be what the document
declares: its status, its schema and its content type."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_server import API_KEY

HERE = Path(__file__).resolve().parent
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(fp32_url: str, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{fp32_url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",  # stateless: the API has no links between operations
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "120",  # a valid request may decode 16 choices to the end of the context on a loaded machine
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1])]),
    }
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
