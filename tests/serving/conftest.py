"""One real `trainonce serve` of the fp32 package (the `champion`), shared by every test module that only reads
from it, so that the default suite starts it once."""

from collections.abc import Iterator

import openai
import pytest

from registry.names import CHAT_MODEL
from registry.promotion import promote
from serving.engine import ChatPackage

from .test_server import API_KEY, running_server


@pytest.fixture(scope="session")
def fp32_url(make_chat_registry) -> Iterator[str]:
    """The server's URL; its alias never moves (modules that promote start their own server)."""
    workdir = make_chat_registry()
    promote(workdir, CHAT_MODEL, "1")  # the fp32 package
    with running_server(workdir) as url:
        yield url


@pytest.fixture(scope="session")
def fp32_client(fp32_url: str) -> openai.OpenAI:
    """The official `openai` client on that server, without retries (a refusal must show at once)."""
    return openai.OpenAI(base_url=f"{fp32_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def fp32_package(chat_packages) -> ChatPackage:
    """The package the server runs, loaded here: what the model computes, to compare the server's answers with."""
    return ChatPackage(chat_packages["fp32"])
