"""Decoded choices in OpenAI's shapes: chat completions and text completions, whole (typed by
serving/response_models.py) or streamed as server-sent events, with `n` choices, log-probabilities in each
endpoint's own layout, and usage.

A request's choices are decoders (serving/decoding.py) that share the prompt; each has its own generator
(models.sampling.choice_generators), so a seeded request repeats and its choices differ. Each choice arrives
here as the stream of its pieces (decoded alone or in a shared batch: serving/batching.py). Streamed choices
are sent one after the other, each chunk naming its `index`, as the `openai` client reassembles them. A text
completion may have many prompts (prompt i's `n` choices are i*n .. i*n+n-1) and echo each before its choices.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from models.sampling import SampledToken, SamplingParams, choice_generators
from serving.decoding import Piece, SequenceDecoder
from serving.engine import ChatPackage
from serving.response_models import ChatCompletion, Completion, Usage


def new_choices(
    package: ChatPackage, prompt: list[int], budget: int, params: SamplingParams, n: int
) -> list[SequenceDecoder]:
    return [package.decoder(prompt, budget, params, rng) for rng in choice_generators(params.seed, n)]


@dataclass(frozen=True)
class Echo:
    """A prompt as an echoed text completion starts its choices: its text and, when log-probabilities are asked
    for, its tokens scored by the model (serving/engine.py's `prompt_logprobs`, the first one unscored)."""

    text: str
    tokens: tuple[SampledToken, ...] = ()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(prompt_tokens: int, choices: Sequence[SequenceDecoder]) -> dict[str, int]:
    """Each prompt counts once, however many choices were generated from it (as OpenAI counts)."""
    return Usage.of(prompt_tokens, sum(d.completion_tokens for d in choices)).model_dump()


class LogprobFormat:
    """Sampled tokens as the two endpoints report them; with `as_token_ids` each token is named `token_id:N`, as
    vLLM's `return_tokens_as_token_ids` names it (a token that is not valid UTF-8 alone stays identifiable), while
    `bytes` and `text_offset` still follow the text."""

    def __init__(self, package: ChatPackage, as_token_ids: bool = False) -> None:
        self.token_text = package.token_texts
        self.as_token_ids = as_token_ids

    def name(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_token_ids else self.token_text(token_id)[0]

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.name(token_id), "logprob": logprob, "bytes": list(self.token_text(token_id)[1])}

    def chat(self, tokens: Sequence[SampledToken]) -> dict[str, Any]:
        """`choices[i].logprobs` of a chat completion: one entry per token, with its alternatives."""
        return {
            "content": [
                {
                    **self._entry(t.token_id, float(t.logprob)),
                    "top_logprobs": [self._entry(i, lp) for i, lp in t.top_logprobs],
                }
                for t in tokens
            ],
            "refusal": None,
        }

    def completion(self, tokens: Sequence[SampledToken], offset: int) -> dict[str, Any]:
        """`choices[i].logprobs` of a text completion: parallel lists, `text_offset` counted from the start of
        the completion (`offset` characters already sent). An echoed prompt's first token, which nothing scores,
        has null for its log-probability and its alternatives."""
        texts = [self.token_text(t.token_id)[0] for t in tokens]
        offsets = [offset + sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {
            "tokens": [self.name(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [
                None if t.logprob is None else {self.name(i): lp for i, lp in t.top_logprobs} for t in tokens
            ],
            "text_offset": offsets,
        }


@dataclass(frozen=True)
class StreamUsage:
    """Which chunks of a stream carry the request's usage: a last chunk of its own (`include_usage`), and with
    `every_chunk` (vLLM's `continuous_usage_stats`) every chunk too, counting the tokens sent so far."""

    final: bool = False
    every_chunk: bool = False

    def so_far(self, prompt_tokens: int, sent: int) -> dict[str, Any]:
        """What a chunk adds after `sent` completion tokens: `usage`, or nothing."""
        return {"usage": Usage.of(prompt_tokens, sent).model_dump()} if self.every_chunk else {}


async def whole_choices(
    choices: list[SequenceDecoder], streams: list[AsyncIterator[Piece]]
) -> list[tuple[int, SequenceDecoder, str, list[SampledToken]]]:
    """Each choice decoded to its end: its index, decoder, text and tokens (with their log-probabilities)."""
    out = []
    for index, (decoder, stream) in enumerate(zip(choices, streams, strict=True)):
        pieces = [piece async for piece in stream]
        out.append((index, decoder, "".join(p.text for p in pieces), [t for p in pieces for t in p.tokens]))
    return out


async def chat_response(
    logprobs: LogprobFormat,
    prompt_tokens: int,
    choices: list[SequenceDecoder],
    streams: list[AsyncIterator[Piece]],
    base: dict[str, Any],
) -> ChatCompletion:
    out = [
        {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs.chat(tokens) if decoder.params.logprobs is not None else None,
            "finish_reason": decoder.finish_reason,
        }
        for index, decoder, text, tokens in await whole_choices(choices, streams)
    ]
    return ChatCompletion.model_validate({**base, "choices": out, "usage": _usage(prompt_tokens, choices)})


async def chat_stream(
    logprobs: LogprobFormat,
    prompt_tokens: int,
    choices: list[SequenceDecoder],
    streams: list[AsyncIterator[Piece]],
    base: dict[str, Any],
    usage: StreamUsage,
) -> AsyncGenerator[str, None]:
    chunk = {**base, "object": "chat.completion.chunk"}
    sent = 0

    def event(index: int, delta: dict, piece: Piece | None = None, finish: str | None = None) -> str:
        with_logprobs = piece is not None and piece.tokens and choices[index].params.logprobs is not None
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs.chat(piece.tokens) if with_logprobs else None,
            "finish_reason": finish,
        }
        return sse({**chunk, "choices": [choice], **usage.so_far(prompt_tokens, sent)})

    for index, (decoder, stream) in enumerate(zip(choices, streams, strict=True)):
        yield event(index, {"role": "assistant", "content": ""})
        async for piece in stream:
            sent += len(piece.tokens)
            yield event(index, {"content": piece.text} if piece.text else {}, piece)
        yield event(index, {}, finish=decoder.finish_reason)
    if usage.final:
        yield sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, choices)})
    yield sse("[DONE]")


async def completion_response(
    logprobs: LogprobFormat,
    prompt_tokens: int,
    choices: list[SequenceDecoder],
    streams: list[AsyncIterator[Piece]],
    base: dict[str, Any],
    echoes: Sequence[Echo | None] = (),
) -> Completion:
    """`echoes`: per choice, the prompt its text starts with (none: not echoed)."""
    out = []
    for index, decoder, text, tokens in await whole_choices(choices, streams):
        echo = echoes[index] if echoes else None
        if echo is not None:
            text, tokens = echo.text + text, [*echo.tokens, *tokens]
        with_logprobs = decoder.params.logprobs is not None
        out.append(
            {
                "index": index,
                "text": text,
                "logprobs": logprobs.completion(tokens, 0) if with_logprobs else None,
                "finish_reason": decoder.finish_reason,
            }
        )
    return Completion.model_validate({**base, "choices": out, "usage": _usage(prompt_tokens, choices)})


async def completion_stream(
    logprobs: LogprobFormat,
    prompt_tokens: int,
    choices: list[SequenceDecoder],
    streams: list[AsyncIterator[Piece]],
    base: dict[str, Any],
    usage: StreamUsage,
    echoes: Sequence[Echo | None] = (),
) -> AsyncGenerator[str, None]:
    """`echoes` as for `completion_response`: an echoed prompt is its choice's first chunk."""
    chunk = {**base, "object": "text_completion"}
    sent = 0
    for index, (decoder, stream) in enumerate(zip(choices, streams, strict=True)):
        offset = 0
        async for piece, generated in _chunks(echoes[index] if echoes else None, stream):
            with_logprobs = piece.tokens and decoder.params.logprobs is not None
            choice = {
                "index": index,
                "text": piece.text,
                "logprobs": logprobs.completion(piece.tokens, offset) if with_logprobs else None,
                "finish_reason": None,
            }
            offset += sum(len(logprobs.token_text(t.token_id)[0]) for t in piece.tokens)
            sent += generated  # an echoed prompt's tokens are not completion tokens
            yield sse({**chunk, "choices": [choice], **usage.so_far(prompt_tokens, sent)})
        final = {"index": index, "text": "", "logprobs": None, "finish_reason": decoder.finish_reason}
        yield sse({**chunk, "choices": [final], **usage.so_far(prompt_tokens, sent)})
    if usage.final:
        yield sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, choices)})
    yield sse("[DONE]")


async def _chunks(echo: Echo | None, stream: AsyncIterator[Piece]) -> AsyncIterator[tuple[Piece, int]]:
    """A text completion choice's pieces, each with the completion tokens it carries: its echoed prompt first (none),
    then what is generated."""
    if echo is not None:
        yield Piece(echo.text, echo.tokens), 0
    async for piece in stream:
        yield piece, len(piece.tokens)


Whole = TypeVar("Whole", ChatCompletion, Completion)


@dataclass(frozen=True)
class ResponseShape(Generic[Whole]):
    """How one endpoint answers: its id prefix, its whole response and its stream of events."""

    id_prefix: str
    whole: Callable[..., Awaitable[Whole]]
    streamed: Callable[..., AsyncGenerator[str, None]]


CHAT_SHAPE = ResponseShape("chatcmpl-", chat_response, chat_stream)
COMPLETION_SHAPE = ResponseShape("cmpl-", completion_response, completion_stream)
