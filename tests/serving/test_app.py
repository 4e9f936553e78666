"""The app's last resort, on a real uvicorn server: an exception no handler expects (a server bug) still answers
OpenAI's error object, on a keep-alive connection that stays usable."""

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from registry.names import CHAT_MODEL
from serving.app import create_app
from serving.family import Family
from serving.model_source import ModelSource

from .test_server import app_in_process, client_end


@pytest.fixture(scope="module")
def app_with_a_bug(make_chat_registry, tmp_path_factory) -> FastAPI:
    source = ModelSource(make_chat_registry(), CHAT_MODEL, None, "1", tmp_path_factory.mktemp("serving-cache"))
    app = create_app(Family([source]))

    @app.get("/v1/bug")
    def bug() -> dict:
        raise TypeError("TextInputSequence must be str")  # what the tokenizer raised on a lone surrogate

    return app


@pytest.fixture(scope="module")
def url(app_with_a_bug: FastAPI) -> Iterator[str]:
    with app_in_process(app_with_a_bug) as url:
        yield url


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays_usable(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        failed = http.get("/v1/bug")
        connection = client_end(failed)
        assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
        assert failed.json() == {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        healthy = http.get("/health")
        assert healthy.json()["status"] == "ok"
        assert client_end(healthy) == connection  # the failure did not drop the keep-alive connection
