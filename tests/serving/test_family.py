"""A family behind one endpoint, end to end through `trainonce serve --also`: two members registered (the model
and a smaller one cut from it), each listed and served by name, a latency budget routed to the best member that
fits, and a promotion of one member that swaps only that member."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from models.extract import extract_subnet
from models.moe import ElasticMoE
from models.subnet import SubnetSpec
from registry.models import register_chat_package
from registry.names import CHAT_MODEL
from registry.promotion import promote
from registry.tracking import RunLogger
from serving import CHAT_PYFUNC_CODE
from tasks.data.corpus import PreparedData
from tasks.deploy.config import DeployConfig
from tasks.deploy.onnx_export import build_packages

from .test_server import API_KEY, running_server

SMALL = f"{CHAT_MODEL}-small"
USER = [{"role": "user", "content": "Repeat: king queen"}]


@pytest.fixture(scope="module")
def family_registry(tmp_path_factory, chat_model: ElasticMoE, small_data: PreparedData, chat_packages) -> Path:
    """`trainonce-chat` (the chat model) and `trainonce-chat-small` (one layer and two experts of it, twice:
    versions 1 and 2), each with a champion."""
    small = extract_subnet(chat_model, SubnetSpec(layers=(0,), experts=((0, 1),), top_k=1))
    folder = tmp_path_factory.mktemp("small-package")
    small_package = build_packages(
        small, small_data.tokenizer_path, small_data.chat_format, folder, DeployConfig(variants=("fp32",))
    )["fp32"]
    workdir = tmp_path_factory.mktemp("family-registry")
    logger = RunLogger(workdir, run_name="export")
    register_chat_package(workdir, logger.run_id, chat_packages["fp32"], {"member": "full"}, CHAT_PYFUNC_CODE)
    for _ in range(2):
        register_chat_package(workdir, logger.run_id, small_package, {"member": "small"}, CHAT_PYFUNC_CODE, SMALL)
    logger.finish()
    promote(workdir, CHAT_MODEL, "1")
    promote(workdir, SMALL, "1")
    return workdir


@pytest.fixture(scope="module")
def url(family_registry: Path) -> Iterator[str]:
    with running_server(family_registry, "--also", SMALL) as url:
        yield url


def test_every_member_is_listed_and_served_by_name(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {CHAT_MODEL, SMALL}
    assert all(card.model_extra["ms_per_token"] > 0 for card in cards.values())
    for name in (CHAT_MODEL, SMALL, f"{SMALL}@champion"):
        raw = client.chat.completions.with_raw_response.create(model=name, messages=USER, max_tokens=4)
        served = name.split("@")[0]
        assert raw.parse().model == served and raw.headers["x-trainonce-model"] == served


def test_a_latency_budget_is_routed_to_the_best_member_that_fits(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    latency = {m.id: m.model_extra["ms_per_token"] for m in client.models.list().data}
    faster, slower = sorted(latency, key=latency.get)
    between = (latency[faster] + latency[slower]) / 2
    for budget, expected in ((between, faster), (latency[slower] * 10, slower)):
        reply = client.chat.completions.create(
            model=CHAT_MODEL, messages=USER, max_tokens=4, extra_body={"max_ms_per_token": budget}
        )
        assert reply.model == expected, (budget, latency)
    by_header = client.chat.completions.with_raw_response.create(
        model=SMALL, messages=USER, max_tokens=4, extra_headers={"X-Max-Ms-Per-Token": str(latency[slower] * 10)}
    )
    assert by_header.headers["x-trainonce-model"] == slower
    with pytest.raises(openai.BadRequestError) as unmet:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=USER, max_tokens=4, extra_body={"max_ms_per_token": latency[faster] / 100}
        )
    assert unmet.value.param == "max_ms_per_token" and faster in unmet.value.message
    with pytest.raises(openai.BadRequestError) as nonsense:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=USER, max_tokens=4, extra_headers={"X-Max-Ms-Per-Token": "fast"}
        )
    assert nonsense.value.param == "X-Max-Ms-Per-Token"


def test_promoting_one_member_swaps_only_that_member(url: str, family_registry: Path) -> None:
    def versions() -> dict[str, str]:
        return {m["model"]: m["version"] for m in httpx.get(f"{url}/health").json()["members"]}

    assert versions() == {CHAT_MODEL: "1", SMALL: "1"}
    promote(family_registry, SMALL, "2")
    deadline = time.monotonic() + 60
    while versions()[SMALL] != "2":
        assert time.monotonic() < deadline, "the server did not pick up the member's promotion"
        time.sleep(0.2)
    assert versions() == {CHAT_MODEL: "1", SMALL: "2"}
