"""`mlflow models serve -m models:/trainonce-chat@champion --env-manager local` answers chat messages."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from models.chat_format import Message
from models.sampling import SamplingParams
from registry.names import CHAT_MODEL
from registry.promotion import promote
from registry.tracking import tracking_uri
from serving.engine import ChatPackage

from .test_server import REPO, free_port, wait_healthy


@pytest.mark.slow
def test_mlflow_models_serve_the_champion(make_chat_registry, chat_packages) -> None:
    workdir = make_chat_registry()
    promote(workdir, CHAT_MODEL, "2")  # the INT8 package
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri(workdir),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{CHAT_MODEL}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, path="/ping")
        messages = [{"role": "user", "content": "Repeat: king queen"}]
        body = {"dataframe_records": [{"messages": messages, "max_tokens": 6}]}
        response = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        row = response.json()["predictions"][0]
        package = ChatPackage(chat_packages["int8"])
        expected = package.complete(package.chat_prompt([Message(**messages[0])]), 6)
        assert row["content"] == expected.text and row["completion_tokens"] == expected.completion_tokens
        sampled = {**body, "params": {"temperature": 1.0, "seed": 4}}
        replies = [httpx.post(f"{url}/invocations", json=sampled, timeout=60).json() for _ in range(2)]
        assert replies[0] == replies[1]  # seeded: the same reply twice
        prompt = package.chat_prompt([Message(**messages[0])])
        assert (
            replies[0]["predictions"][0]["content"]
            == package.complete(prompt, 6, SamplingParams(temperature=1.0, seed=4)).text
        )
        refused = httpx.post(f"{url}/invocations", json={**body, "params": {"top_p": 5.0}}, timeout=60)
        assert refused.status_code >= 400 and "top_p" in refused.text
    finally:
        process.terminate()
        process.wait(timeout=30)
