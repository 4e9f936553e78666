"""The real server process, queried with the official `openai` client: chat, streaming, completions, errors,
API key, and a promotion picked up while serving."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from flows.readiness import free_port, http_ok, wait_until_ready
from models.chat_format import Message
from registry.names import CHAT_MODEL
from registry.promotion import promote
from serving.engine import ChatPackage

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-trainonce-test"


def wait_healthy(
    url: str, process: subprocess.Popen, path: str = "/health", log: IO[str] | None = None
) -> httpx.Response:
    """`log`: the file the server writes to, when not its stdout pipe."""

    def output() -> str:  # the server's own words, once it has exited
        if process.poll() is None:
            return ""
        if log is not None:
            log.seek(0)
            return log.read()
        return process.stdout.read() if process.stdout else ""

    return wait_until_ready(http_ok(f"{url}{path}"), f"the server at {url}", process, log=output)


@contextmanager
def running_server(workdir: Path, *options: str) -> Iterator[str]:
    """`trainonce serve` on the registry in `workdir` (champion alias), in its own process, until the block ends;
    `options` are more command-line options. Its output goes to a file: a pipe nobody reads fills up after a few
    hundred requests' access-log lines, and the server then blocks on its next write (schemathesis saw it hang)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed when the block ends
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--workdir",
            str(workdir),
            "--port",
            str(port),
            "--api-key",
            API_KEY,
            "--poll-seconds",
            "0.5",
            "--threads",
            "1",
            *options,
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with log, serving(process, f"http://127.0.0.1:{port}", log) as url:
        yield url


@contextmanager
def serving(process: subprocess.Popen, url: str, log: IO[str] | None = None) -> Iterator[str]:
    """A server process listening at `url`, once its /health answers, until the block ends; `log` as for
    `wait_healthy`."""
    try:
        wait_healthy(url, process, log=log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def app_in_process(app: FastAPI) -> Iterator[str]:
    """`app` on a real uvicorn server in a thread of this process (to serve objects a test builds)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(make_chat_registry) -> Iterator[tuple[str, Path]]:
    workdir = make_chat_registry()
    promote(workdir, CHAT_MODEL, "1")
    with running_server(workdir) as url:
        yield url, workdir


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
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL, messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
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
        assert out_of_range.value.param == "max_tokens" and "1" in out_of_range.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "word " * 400}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(
        f"{server[0]}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"


def client_end(response: httpx.Response) -> tuple[str, int] | None:
    """The client end of the TCP connection a response came on (equal for two responses on one keep-alive
    connection), None if the server dropped the connection with the response."""
    try:
        return response.extensions["network_stream"].get_extra_info("client_addr")
    except OSError:  # httpx closed the socket on seeing the server close it
        return None


def test_unencodable_text_is_a_400_on_a_connection_that_stays_usable(server) -> None:
    lone = "a\ud800b"  # a lone surrogate: json.dumps escapes it as valid JSON, but it is not encodable text
    user = {"role": "user", "content": "hi"}
    bad_requests = [
        ("chat/completions", {"messages": [user, {"role": "user", "content": lone}]}, "messages.1.content"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]},
            "messages.0.content",
        ),
        ("completions", {"prompt": lone}, "prompt"),
        ("completions", {"prompt": [lone]}, "prompt"),
    ]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=f"{server[0]}/v1", headers=headers, timeout=60) as http:
        for route, fields, param in bad_requests:
            refused = http.post(route, content=json.dumps({"model": CHAT_MODEL, "max_tokens": 2, **fields}))
            connection = client_end(refused)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == param
            assert refused.json()["error"]["type"] == "invalid_request_error"
            good = http.post(
                "chat/completions",
                json={"model": CHAT_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert good.status_code == 200, good.text
            assert client_end(good) == connection  # the refusal did not drop the keep-alive connection
        # what the Responses API sends back as it was sent must be encodable too
        echoed = http.post(
            "responses", content=json.dumps({"model": CHAT_MODEL, "input": "hi", "metadata": {"a": lone}})
        )
        assert echoed.status_code == 400 and echoed.json()["error"]["param"] == "metadata", echoed.text
        unknown = http.post("completions", content=json.dumps({"model": lone, "prompt": "hi", "max_tokens": 2}))
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found", unknown.text


def _openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_every_refusal_is_an_openai_error_object(server, client: openai.OpenAI) -> None:
    url = server[0]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    unknown = _openai_error(httpx.post(f"{url}/v1/chat/completion", headers=headers, json={}), 404)
    assert "POST /v1/chat/completion" in unknown["message"] and unknown["code"] == "unknown_url"
    wrong_method = _openai_error(httpx.get(f"{url}/v1/chat/completions", headers=headers), 405)
    assert "GET /v1/chat/completions" in wrong_method["message"] and wrong_method["code"] == "method_not_allowed"
    nested = b"[" * 100_000 + b"]" * 100_000
    for unparsable in (b'{"model": "\xff\xfe"}', nested):
        response = httpx.post(f"{url}/v1/chat/completions", headers=headers, content=unparsable)
        assert _openai_error(response, 400)["code"] == "invalid_json"
    for not_an_object in (b"null", b"[]", b'"hi"', b"3"):
        response = httpx.post(f"{url}/v1/chat/completions", headers=headers, content=not_an_object)
        error = _openai_error(response, 400)
        assert error["param"] is None and error["message"] == "The request body must be a JSON object."
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": [audio]}])
    assert refused.value.param == "messages.0.content.0.type"
    assert "only text and image_url content parts" in refused.value.message and "input_audio" in refused.value.message
    image = {"type": "image_url", "image_url": {"url": "https://example.com/king.png"}}
    with pytest.raises(openai.BadRequestError) as refused:  # a text-only model: no image tokenizer in its package
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]
        )
    assert refused.value.param == "messages.0.content.1.image_url.url" and refused.value.code == "images_unsupported"


def test_models_retrieve_and_list_report_when_the_model_was_loaded(client: openai.OpenAI) -> None:
    card = client.models.retrieve(CHAT_MODEL)
    assert card.id == CHAT_MODEL and card.owned_by == "trainonce"
    assert time.time() - 3600 < card.created <= time.time()
    assert client.models.list().data[0].created == card.created
    assert client.models.retrieve(f"{CHAT_MODEL}@champion").id == CHAT_MODEL
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-4o")
    assert unknown.value.code == "model_not_found"


def test_openapi_declares_the_errors_the_routes_answer(server) -> None:
    paths = httpx.get(f"{server[0]}/openapi.json").json()["paths"]
    for path, method in (
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/responses", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
    ):
        responses = paths[path][method]["responses"]
        assert "422" not in responses  # validation errors are answered as 400s
        errors = [code for code in responses if code != "200"]
        assert "401" in errors and "default" in errors
        for code in errors:
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        assert {"400", "404"} <= set(paths[path]["post"]["responses"])
    assert "404" in paths["/v1/models/{model}"]["get"]["responses"]


def test_openapi_declares_the_typed_answers(server) -> None:
    document = httpx.get(f"{server[0]}/openapi.json").json()
    for path, method, model in (
        ("/health", "get", "Health"),
        ("/v1/models", "get", "ModelList"),
        ("/v1/models/{model}", "get", "ModelCard"),
        ("/v1/chat/completions", "post", "ChatCompletion"),
        ("/v1/completions", "post", "Completion"),
        ("/v1/responses", "post", "ResponseObject"),
    ):
        answer = document["paths"][path][method]["responses"]["200"]["content"]
        assert answer["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert ("text/event-stream" in answer) == (method == "post")  # the generation routes also stream
    schemas = document["components"]["schemas"]
    choice = schemas["ChatCompletionChoice"]
    assert set(choice["required"]) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["properties"]["finish_reason"]["enum"] == ["stop", "length"]
    assert {"object", "owned_by", "context_length", "ms_per_token"} <= set(schemas["ModelCard"]["required"])


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


def test_openapi_declares_the_limits_the_server_enforces(server) -> None:
    """A schema-valid request is never refused for a bound the schema leaves out (schemathesis checks this)."""
    schemas = httpx.get(f"{server[0]}/openapi.json").json()["components"]["schemas"]

    def bounds(model: str, field: str) -> dict:
        spec = schemas[model]["properties"][field]
        declared = [spec, *spec.get("anyOf", [])]
        return {k: v for d in declared for k, v in d.items() if k in {"minimum", "maximum", "exclusiveMinimum"}}

    chat = "ChatCompletionRequest"
    assert bounds(chat, "max_tokens") == bounds(chat, "max_completion_tokens") == {"minimum": 1}
    assert bounds("CompletionRequest", "max_tokens") == {"minimum": 0}  # 0 only with echo
    assert bounds(chat, "n") == {"minimum": 1, "maximum": 16}
    assert bounds(chat, "temperature") == {"minimum": 0, "maximum": 2}
    assert bounds(chat, "top_p") == {"exclusiveMinimum": 0, "maximum": 1}
    assert bounds(chat, "presence_penalty") == bounds(chat, "frequency_penalty") == {"minimum": -2, "maximum": 2}
    assert bounds(chat, "top_logprobs") == bounds("CompletionRequest", "logprobs") == {"minimum": 0, "maximum": 20}
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]  # nothing in a prompt may be empty
    assert [p.get("minLength", p.get("minItems")) for p in prompt] == [1, 1, 1, 1]
    stop = schemas[chat]["properties"]["stop"]["anyOf"]
    assert {"type": "string", "minLength": 1, "maxLength": 256} in stop
    assert any(s.get("maxItems") == 16 and s["items"].get("minLength") == 1 for s in stop)
