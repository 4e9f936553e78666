"""Batched decoding gives every sequence exactly what it gets alone, whatever its length and whoever shares its
batch; a full queue is refused before decoding (429 over HTTP); an abandoned sequence leaves the batch."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from models.chat_format import Message
from models.sampling import SamplingParams
from registry.names import CHAT_MODEL
from serving.app import create_app
from serving.batching import DecodeBatcher, QueueFull
from serving.engine import ChatPackage
from serving.family import Family
from serving.model_source import Batching, ModelSource

from .test_server import app_in_process

QUESTIONS = ["Repeat: king", "Sort: pear apple fig banana cherry", "hi", "Copy: to be or not to be, that is it"]


@pytest.fixture(scope="module", params=["fp32", "int4", "traced-fp32"])
def package(request, chat_packages, traced_packages) -> ChatPackage:
    """The fused graph's rows are right-padded, the traced graph's left-padded: both batch exactly."""
    graph, _, variant = request.param.rpartition("-")
    return ChatPackage((traced_packages if graph == "traced" else chat_packages)[variant], threads=1)


def prompts(package: ChatPackage) -> list[list[int]]:
    return [package.chat_prompt([Message(role="user", content=q)]) for q in QUESTIONS]


def test_a_batched_sequence_decodes_exactly_as_it_does_alone(package: ChatPackage) -> None:
    params = [
        SamplingParams(ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=3, logprobs=0),
        SamplingParams(),  # stops at the end of turn: leaves the batch early
        SamplingParams(temperature=0.7, top_p=0.9, seed=1, stop=("e",)),
    ]
    budgets = [14, 9, 20, 12]
    alone = [package.complete(p, b, s) for p, b, s in zip(prompts(package), budgets, params, strict=True)]
    for max_batch in (4, 2):  # all rows at once, and rows joining as others leave
        batcher = DecodeBatcher(package, max_batch=max_batch, max_waiting=8)
        decoders = [package.decoder(p, b, s) for p, b, s in zip(prompts(package), budgets, params, strict=True)]
        streams = batcher.submit(decoders)
        for expected, decoder, stream in zip(alone, decoders, streams, strict=True):
            pieces = list(stream)
            assert "".join(p.text for p in pieces) == expected.text
            assert tuple(decoder.ids) == expected.token_ids and decoder.finish_reason == expected.finish_reason
            batched_logprobs = [t.logprob for p in pieces for t in p.tokens]
            np.testing.assert_allclose(
                np.asarray(batched_logprobs, dtype=float),
                np.asarray([t.logprob for t in expected.tokens], dtype=float),
                atol=1e-4,
            )


def test_a_full_queue_is_refused_before_decoding_and_abandoned_rows_leave(package: ChatPackage) -> None:
    batcher = DecodeBatcher(package, max_batch=2, max_waiting=2)
    prompt = prompts(package)[0]
    with pytest.raises(QueueFull, match="at most 2"):
        batcher.submit([package.decoder(prompt, 8) for _ in range(3)])  # all or none
    long = package.decoder(prompt, package.room_for(prompt), SamplingParams(ignore_eos=True))
    (stream,) = batcher.submit([long])
    next(stream)
    del stream  # the reader went away
    deadline = time.monotonic() + 60
    while batcher._thread is not None:  # the loop drops the row and, with nothing left, ends
        assert time.monotonic() < deadline, "the abandoned sequence kept decoding"
        time.sleep(0.05)
    assert long.completion_tokens < package.room_for(prompt)


def test_every_sequence_the_server_may_hold_can_wait_in_a_thread_of_its_own(make_chat_registry, tmp_path) -> None:
    """Starlette sends each streamed chunk from a worker thread, where the stream waits for its next piece: the app
    sizes anyio's pool for every sequence its members may hold (decoding or queued), beside the default 40."""
    import anyio
    import anyio.to_thread

    source = ModelSource(make_chat_registry(), CHAT_MODEL, None, "1", tmp_path, batching=Batching(8, 300))
    app = create_app(Family([source]))

    async def pool_size_while_serving() -> int:
        async with app.router.lifespan_context(app):
            return anyio.to_thread.current_default_thread_limiter().total_tokens

    assert anyio.run(pool_size_while_serving) == 40 + 8 + 300


@pytest.fixture(scope="module")
def batched_url(make_chat_registry, tmp_path_factory) -> Iterator[str]:
    """The app in-process on uvicorn, batching with a small queue (so that a 429 is easy to provoke)."""
    workdir = make_chat_registry()
    cache = tmp_path_factory.mktemp("serving-cache")
    source = ModelSource(workdir, CHAT_MODEL, None, "1", cache, batching=Batching(max_batch=8, max_waiting=4))
    with app_in_process(create_app(Family([source]))) as url:
        yield url


def test_concurrent_clients_get_what_each_gets_alone(batched_url: str, chat_packages) -> None:
    client = openai.OpenAI(base_url=f"{batched_url}/v1", api_key="none", max_retries=5, timeout=120)
    reference = ChatPackage(chat_packages["fp32"])

    def ask(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=16)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, QUESTIONS * 2))
    expected = [reference.complete(p, 16).text for p in prompts(reference)] * 2
    assert replies == expected
    with pytest.raises(openai.RateLimitError) as busy:
        openai.OpenAI(base_url=f"{batched_url}/v1", api_key="none", max_retries=0).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=5
        )
    assert busy.value.code == "queue_full"
