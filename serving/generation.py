"""What every generation endpoint does around its prompt: check the request's sampling controls and token budget
against the model it runs on, decode its choices (counted and timed per model, refused with a 429 when the batch
queue is full or they waited too long for a row) and answer in the endpoint's shape (serving/responses.py,
serving/responses_api.py), whole or streamed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Response
from fastapi.responses import StreamingResponse
from prometheus_client import Gauge
from starlette.types import Receive, Scope, Send

from models.sampling import SamplingParams
from serving.batching import PieceStream, QueueFull, QueueTimeout
from serving.decoding import Piece, SequenceDecoder
from serving.engine import ChatPackage
from serving.errors import ApiError, error_responses
from serving.metrics import ServingMetrics
from serving.model_source import LoadedModel
from serving.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from serving.responses import Echo, LogprobFormat, ResponseShape, StreamUsage, Whole, new_choices

Answer = TypeVar("Answer")
SERVED_BY_HEADER = "X-Trainonce-Model"  # the member that answered (also the response's `model`)

# A generation route's OpenAPI `responses`: its answer is JSON, or with `stream: true` server-sent events, and its
# refusals are OpenAI's error object.
RESPONSES = {200: {"content": {"text/event-stream": {}}}, **error_responses(400, 401, 404, 429)}


def sampling(request: GenerationRequest, package: ChatPackage) -> SamplingParams:
    """The request's decoding controls, refused before any decoding if this model cannot honour them."""
    unsupported = request.unsupported_parameter()
    if unsupported is not None:
        raise ApiError(400, f"{unsupported} is not supported by this server.", unsupported, "unsupported_parameter")
    params = request.sampling(request.requested_logprobs(), _bad_words_ids(package, request.bad_words or []))
    vocab = package.config.vocab_size
    for param, ids in params.token_ids().items():
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            raise ApiError(
                400, f"{param}: token ids must be in [0, {vocab - 1}]; got {outside[:5]}", param, "invalid_token_id"
            )
    return params


def _bad_words_ids(package: ChatPackage, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word as vLLM tokenizes it: alone, and after a space when that makes a different word of as many
    tokens, so the word is banned at the start of the text and inside it."""
    ids: list[tuple[int, ...]] = []
    for word in words:
        alone = tuple(package.tokenizer.encode(word.lstrip(), add_special_tokens=False).ids)
        spaced = tuple(package.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False).ids)
        ids.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            ids.append(spaced)
    return tuple(ids)


def token_budget(
    package: ChatPackage,
    prompt: list[int],
    requested: tuple[str, int | None],
    prompt_param: str,
    scores_prompt: bool = False,
) -> int:
    """How many tokens to generate: the request's max_tokens (or max_completion_tokens: `requested` names the field
    the client sent) checked against the context left after the prompt. A request that `scores_prompt` (an echo)
    may generate nothing, so its prompt may fill the context."""
    limit = package.config.max_seq_len
    room = package.room_for(prompt)
    least = 0 if scores_prompt else 1
    if room < least:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt)}. Shorten it.",
            prompt_param,
            "context_length_exceeded",
        )
    param, tokens = requested
    if tokens is None:
        return min(package.config.default_max_new_tokens, room)
    if not least <= tokens <= room:
        raise ApiError(
            400,
            f"{param}={tokens} is out of range: it must be in [{least}, {room}] (the "
            f"{limit}-token context minus the {len(prompt)}-token prompt).",
            param,
            "context_length_exceeded",
        )
    return tokens


async def _decoding(
    metrics: ServingMetrics, loaded: LoadedModel, prompt_tokens: int, choices: list[SequenceDecoder]
) -> list[AsyncIterator[Piece]]:
    """Start this request's choices on its model, all in one submission, their pieces delivered to this event loop,
    timed and counted per model; a choice with nothing to generate (`max_tokens: 0`) is not decoded. Returns once
    every choice has its first piece, so that a request refused for the queue (full, or a choice waited too long for
    a row) gets its 429 before any answer starts, streamed or not."""
    started = time.perf_counter()
    decoded = sum(not c.finished for c in choices)
    if decoded > loaded.batcher.max_waiting:  # a 429 would tell the client to retry what can never be queued
        raise ApiError(
            400,
            f"This request asks for {decoded} sequences (prompts x n); the server queues at most "
            f"{loaded.batcher.max_waiting} at a time.",
            "n",
            "too_many_choices",
        )
    submitted: list[PieceStream] = []
    try:
        submitted = loaded.batcher.submit([c for c in choices if not c.finished], asyncio.get_running_loop())
        metrics.prompt_tokens.labels(loaded.name).inc(prompt_tokens)
        queued = iter(submitted)
        streams = [_pieces() if c.finished else metrics.observed(loaded.name, next(queued), started) for c in choices]
        firsts = [await anext(stream, None) for stream in streams]
    except (QueueFull, QueueTimeout) as error:
        for stream in submitted:  # the choices that did start stop now, not when the garbage collector finds them
            stream.abandon()
        code = "queue_full" if isinstance(error, QueueFull) else "queue_timeout"
        raise ApiError(429, f"The server is busy ({error}); retry shortly.", None, code, "server_busy") from error
    return [_pieces(first, stream) for first, stream in zip(firsts, streams, strict=True)]


async def _pieces(first: Piece | None = None, rest: AsyncIterator[Piece] | None = None) -> AsyncIterator[Piece]:
    """`first`, then the rest of a choice's pieces; none if there is no first."""
    if first is None:
        return
    yield first
    if rest is not None:
        async for piece in rest:
            yield piece


class RunningStream(StreamingResponse):
    """A streamed answer, counted as running from its creation until it ends, however it ends: sent to the end,
    its client gone (Starlette cancels the sending) or failed. Its events are then closed, which drops the
    choices' piece streams and so stops their decoding. A `with` inside the event generator would only end when
    the abandoned generator is collected, which after a disconnect took minutes."""

    def __init__(self, events: AsyncGenerator[str, None], running: Gauge, headers: dict[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.events, self.running = events, running
        running.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # Starlette is no longer inside the generator: it was cancelled or has finished
            self.running.dec()
            await self.events.aclose()


@dataclass(frozen=True)
class Decoding:
    """A request's choices, started on its model: what its answer is written from, whatever its endpoint."""

    loaded: LoadedModel
    choices: list[SequenceDecoder]
    streams: list[AsyncIterator[Piece]]  # each choice's pieces, as they are decoded
    prompt_tokens: int  # each prompt counted once, however many choices it has
    base: dict[str, Any]  # what every answer and chunk of the request carries: id, created, model, version


async def start(
    loaded: LoadedModel,
    prompts: Sequence[tuple[list[int], int]],
    params: SamplingParams,
    n: int,
    metrics: ServingMetrics,
    id_prefix: str,
) -> Decoding:
    """Start decoding `n` choices of each of `prompts` (its token ids and budget), in order, all together, on the
    event loop the answer is written from; returns when every choice has its first piece."""
    package = loaded.package
    choices = [c for ids, budget in prompts for c in new_choices(package, ids, budget, params, n)]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    base = {
        "id": f"{id_prefix}{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": loaded.name,
        "system_fingerprint": loaded.version,
    }
    streams = await _decoding(metrics, loaded, prompt_tokens, choices)
    return Decoding(loaded, choices, streams, prompt_tokens, base)


async def answer(
    decoding: Decoding,
    stream: bool,
    whole: Callable[[], Awaitable[Answer]],
    events: Callable[[], AsyncGenerator[str, None]],
    metrics: ServingMetrics,
    response: Response,
) -> Answer | StreamingResponse:
    """The answer to a started request, counted as running while it is written: `whole()` decoded to its end,
    or with `stream` the server-sent `events()`."""
    name = decoding.loaded.name
    if stream:
        return RunningStream(events(), metrics.running.labels(name), {SERVED_BY_HEADER: name})
    response.headers[SERVED_BY_HEADER] = name
    with metrics.running.labels(name).track_inprogress():
        return await whole()


async def respond(
    request: ChatCompletionRequest | CompletionRequest,
    loaded: LoadedModel,
    prompts: Sequence[tuple[list[int], int]],
    params: SamplingParams,
    shape: ResponseShape[Whole],
    metrics: ServingMetrics,
    response: Response,
    echoes: Sequence[Echo] = (),
) -> Whole | StreamingResponse:
    """Decode a completions request's choices on its model and answer in the endpoint's shape, whole or streamed.
    Each of `prompts` (its token ids and budget) gets `n` choices; `echoes`, when given, has one per prompt."""
    decoding = await start(loaded, prompts, params, request.n, metrics, shape.id_prefix)
    extra = {"echoes": [e for e in echoes for _ in range(request.n)]} if echoes else {}
    logprobs = LogprobFormat(loaded.package, request.return_tokens_as_token_ids)
    written = (logprobs, decoding.prompt_tokens, decoding.choices, decoding.streams, decoding.base)
    usage = StreamUsage(request.include_usage(), request.continuous_usage())
    return await answer(
        decoding,
        request.stream,
        lambda: shape.whole(*written, **extra),
        lambda: shape.streamed(*written, usage, **extra),
        metrics,
        response,
    )
