"""Batched decoding gives every sequence exactly what it gets alone, whatever its length and whoever shares its
batch; a full queue is refused before decoding (429 over HTTP); an abandoned sequence leaves the batch."""

import asyncio
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import openai
import pytest

from models.chat_format import Message
from models.sampling import SamplingParams
from registry.names import CHAT_MODEL
from serving.app import create_app
from serving.batching import Batching, DecodeBatcher, QueueFull, QueueTimeout
from serving.decoding import Piece
from serving.engine import MODEL_FILE, ChatPackage
from serving.family import Family
from serving.model_source import ModelSource

from .test_server import app_in_process

QUESTIONS = ["Repeat: king", "Sort: pear apple fig banana cherry", "hi", "Copy: to be or not to be, that is it"]


def pre_batching_package(traced: Path, folder: Path) -> Path:
    """`traced` as exported before batched decoding: the same graph without its `pad_lengths` input (every row
    unpadded)."""
    model = onnx.load(traced / MODEL_FILE)
    graph = model.graph
    (pad,) = [i for i in graph.input if i.name == "pad_lengths"]
    graph.input.remove(pad)
    batch = onnx.helper.make_node("Shape", ["input_ids"], ["batch_size"], start=0, end=1)
    zeros = onnx.helper.make_node(
        "ConstantOfShape", ["batch_size"], ["pad_lengths"], value=onnx.numpy_helper.from_array(np.zeros(1, np.int64))
    )
    graph.node.insert(0, zeros)
    graph.node.insert(0, batch)
    shutil.copytree(traced, folder, ignore=shutil.ignore_patterns(MODEL_FILE))
    onnx.save(model, folder / MODEL_FILE)
    return folder


@pytest.fixture(scope="module", params=["fp32", "int4", "traced-fp32", "pre-batching-fp32"])
def package(request, chat_packages, traced_packages, tmp_path_factory) -> ChatPackage:
    """The fused graph's rows are right-padded, the traced graph's left-padded: both batch exactly. A graph from
    before batched decoding decodes its sequences one at a time, exactly too."""
    graph, _, variant = request.param.rpartition("-")
    if graph == "pre-batching":
        folder = pre_batching_package(traced_packages[variant], tmp_path_factory.mktemp("pre-batching") / variant)
        package = ChatPackage(folder, threads=1)
        assert not package.generator.batches_rows
        return package
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
        batcher = DecodeBatcher(package, Batching(max_batch=max_batch, max_waiting=8))
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


def test_pieces_reach_the_event_loop_they_were_submitted_with(package: ChatPackage) -> None:
    """The server reads its sequences' pieces on its event loop (`async for`, no thread per stream): the same
    pieces a thread reads, for every row of a batch."""
    prompt, params = prompts(package)[1], SamplingParams(ignore_eos=True)
    expected = package.complete(prompt, 12, params)
    batcher = DecodeBatcher(package, Batching(max_batch=2, max_waiting=8))

    async def read() -> list[list[Piece]]:
        streams = batcher.submit([package.decoder(prompt, 12, params) for _ in range(3)], asyncio.get_running_loop())
        return [[piece async for piece in stream] for stream in streams]

    for pieces in asyncio.run(asyncio.wait_for(read(), timeout=120)):  # undelivered pieces fail, not hang
        assert "".join(p.text for p in pieces) == expected.text
        assert [t.token_id for p in pieces for t in p.tokens] == list(expected.token_ids)


def test_a_full_queue_is_refused_before_decoding_and_abandoned_rows_leave(package: ChatPackage) -> None:
    batcher = DecodeBatcher(package, Batching(max_batch=2, max_waiting=2))
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


def test_a_sequence_that_waits_too_long_for_a_row_leaves_the_queue(chat_packages) -> None:
    """Behind a full batch, a sequence waits at most `max_wait_seconds` (here none at all) and then fails with
    QueueTimeout; the row that held the batch decodes to its end."""
    package = ChatPackage(chat_packages["fp32"], threads=1)
    batcher = DecodeBatcher(package, Batching(max_batch=1, max_waiting=8, max_wait_seconds=0.0))
    prompt = prompts(package)[0]
    running, waiting = (package.decoder(prompt, 16, SamplingParams(ignore_eos=True)) for _ in range(2))
    first, second = batcher.submit([running, waiting])
    with pytest.raises(QueueTimeout, match="waited over 0 s"):
        next(second)
    assert "".join(p.text for p in first) == package.complete(prompt, 16, SamplingParams(ignore_eos=True)).text
    assert waiting.completion_tokens == 0


async def _all_pieces(stream) -> list[Piece]:
    return [piece async for piece in stream]


def test_a_decoding_loop_that_cannot_go_on_fails_every_reader_and_the_next_submission_starts_over(
    chat_packages, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed step fails its rows, and the loop then needs a fresh batch: when even that fails (no memory for its
    caches), the sequences still waiting must fail too, not wait for a loop that has stopped."""
    package = ChatPackage(chat_packages["fp32"], threads=1)
    batcher = DecodeBatcher(package, Batching(max_batch=1, max_waiting=8))
    prompt = prompts(package)[0]

    def step_fails() -> np.ndarray:
        raise RuntimeError("the step failed")

    def no_memory() -> None:
        raise MemoryError("no memory for a new batch")

    async def read_both() -> list[object]:
        streams = batcher.submit([package.decoder(prompt, 8) for _ in range(2)], asyncio.get_running_loop())
        read = asyncio.gather(*(_all_pieces(stream) for stream in streams), return_exceptions=True)
        return await asyncio.wait_for(read, timeout=120)  # a reader left waiting fails the test, not hangs it

    with monkeypatch.context() as patch:
        patch.setattr(batcher._batch, "step", step_fails)
        patch.setattr(batcher, "_new_batch", no_memory)
        running, waiting = asyncio.run(read_both())
    assert isinstance(running, RuntimeError) and isinstance(waiting, MemoryError)
    (again,) = batcher.submit([package.decoder(prompt, 8)])
    assert "".join(piece.text for piece in again) == package.complete(prompt, 8).text


def test_a_request_refused_by_the_queue_gets_a_429_before_its_answer_starts(make_chat_registry, tmp_path) -> None:
    """Every choice has its first piece before a request's answer starts, so a choice refused by the queue makes the
    request a 429 (`queue_timeout`), streamed or not, never an answer cut off midway. The refused request's choice
    that did start stops with the 429 and frees its row: the next request, with no waiting allowed, gets it rather
    than a 429 behind 120 tokens nobody will read."""
    source = ModelSource(
        make_chat_registry(), CHAT_MODEL, None, "1", tmp_path, batching=Batching(1, 8, max_wait_seconds=0.0)
    )
    options = source.current.package.generator.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # the server shares its cores
    with app_in_process(create_app(Family([source]))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as busy:
                client.chat.completions.create(
                    model=CHAT_MODEL,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=120,
                    n=2,
                    stream=stream,
                    extra_body={"ignore_eos": True},
                )
            assert busy.value.code == "queue_timeout"
        alone = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
        assert alone.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def batched_url(make_chat_registry, tmp_path_factory) -> Iterator[str]:
    """The app in-process on uvicorn, batching with a small queue."""
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
    with pytest.raises(openai.BadRequestError) as never:  # more sequences than the queue holds: a retry cannot help
        openai.OpenAI(base_url=f"{batched_url}/v1", api_key="none", max_retries=0).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=5
        )
    assert never.value.code == "too_many_choices"
