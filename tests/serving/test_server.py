"""The real server process, queried with the official `openai` client: chat, streaming, completions, errors,
API key, and a promotion picked up while serving."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from registry.models import CHAT_MODEL
from registry.promotion import promote
from serving.engine import ChatPackage
from tasks.chat_format import Message

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-trainonce-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 90.0, path: str = "/health") -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}"
            )
        try:
            return httpx.get(f"{url}{path}", timeout=2).raise_for_status()
        except httpx.HTTPError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def server(make_chat_registry) -> Iterator[tuple[str, Path]]:
    workdir = make_chat_registry()
    promote(workdir, CHAT_MODEL, "1")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--workdir", str(workdir), "--port", str(port),
         "--api-key", API_KEY, "--poll-seconds", "0.5", "--threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, workdir
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _expected(package_dir: Path, text: str, max_tokens: int) -> str:
    package = ChatPackage(package_dir)
    return package.complete(package.chat_prompt([Message(role="user", content=text)]), max_tokens).text


def test_chat_completion(client: openai.OpenAI, chat_packages) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Repeat: king queen"}], max_tokens=12
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _expected(chat_packages["fp32"], "Repeat: king queen", 12)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [CHAT_MODEL]


def test_streamed_chat_equals_the_whole_reply(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Sort: pear apple fig"}]
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=16)
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion(client: openai.OpenAI) -> None:
    result = client.completions.create(model=CHAT_MODEL, prompt="To be, or not to be", max_tokens=5)
    assert result.choices[0].finish_reason in ("stop", "length") and result.usage.completion_tokens <= 5
    streamed = client.completions.create(model=CHAT_MODEL, prompt="To be, or not to be", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, client: openai.OpenAI) -> None:
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=user)
    assert unknown.value.code == "model_not_found"
    for bad in (0, 100_000):
        with pytest.raises(openai.BadRequestError) as out_of_range:
            client.chat.completions.create(model=CHAT_MODEL, messages=user, max_tokens=bad)
        assert out_of_range.value.param == "max_tokens" and "[1," in out_of_range.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(f"{server[0]}/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"


def test_promotion_is_picked_up_without_dropping_requests(server, client: openai.OpenAI, chat_packages) -> None:
    url, workdir = server
    assert httpx.get(f"{url}/health").json()["version"] == "1"
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Copy: the king"}], max_tokens=40, stream=True
    )
    first = next(iter(stream))
    promote(workdir, CHAT_MODEL, "3")  # the INT4 package
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").json()["version"] != "3":
        assert time.monotonic() < deadline, "the server did not pick up the promotion"
        time.sleep(0.2)
    rest = list(stream)  # the request that started on version 1 completes on version 1
    assert {c.system_fingerprint for c in [first, *rest]} == {"1"}
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Repeat: king queen"}], max_tokens=12
    )
    assert reply.system_fingerprint == "3"
    assert reply.choices[0].message.content == _expected(chat_packages["int4"], "Repeat: king queen", 12)
