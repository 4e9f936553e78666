"""The OpenAI-compatible HTTP API over a `ModelSource`: /health, /v1/models, /v1/completions,
/v1/chat/completions (with SSE streaming ending in `data: [DONE]`).

Endpoints are plain functions, so FastAPI runs them in its thread pool: onnxruntime sessions are
thread-safe and release the GIL, so concurrent requests decode in parallel. Each request takes the model
it will use once, at its start, which is what makes a hot swap safe for requests already running.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from serving.engine import ChatPackage, finish_reason
from serving.model_source import LoadedModel, ModelSource
from serving.protocol import ChatCompletionRequest, CompletionRequest, Usage, error_body, new_id, now
from tasks.chat_format import Message


class ApiError(Exception):
    """A request the server refuses, answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _budget(package: ChatPackage, prompt: list[int], requested: int | None, prompt_param: str) -> int:
    """How many tokens to generate: the request's max_tokens checked against the context left after the prompt."""
    limit = package.config.max_seq_len
    room = package.room_for(prompt)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt)}. "
                       "Shorten it.", prompt_param, "context_length_exceeded")  # fmt: skip
    if requested is None:
        return min(package.config.default_max_new_tokens, room)
    if not 1 <= requested <= room:
        raise ApiError(400, f"max_tokens={requested} is out of range: it must be in [1, {room}] (the "
                       f"{limit}-token context minus the {len(prompt)}-token prompt).", "max_tokens")  # fmt: skip
    return requested


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(source: ModelSource, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="trainonce", description="OpenAI-compatible API over a registered trainonce-chat model")

    @app.exception_handler(ApiError)
    def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.param, error.code, error.kind), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("The request body is not valid JSON.", None, "invalid_json"), 400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param}: {first.get('msg')}", param, "invalid_value"), 400)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key", "authentication_error")

    def model_for(requested: str) -> LoadedModel:
        loaded = source.current  # taken once: this request finishes on this model even if the alias moves
        if requested not in (source.name, source.reference, f"{source.name}/{loaded.version}"):
            raise ApiError(404, f"The model {requested!r} does not exist; this server serves {source.name!r}.",
                           "model", "model_not_found")  # fmt: skip
        return loaded

    @app.get("/health")
    def health() -> dict:
        loaded = source.current
        return {"status": "ok", "model": loaded.name, "version": loaded.version, "reference": source.reference}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> dict:
        loaded = source.current
        card = {"id": loaded.name, "object": "model", "created": 0, "owned_by": "trainonce",
                "version": loaded.version, "quantization": loaded.package.config.quantization,
                "context_length": loaded.package.config.max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    def chat_completions(request: ChatCompletionRequest) -> dict | StreamingResponse:
        loaded = model_for(request.model)
        package = loaded.package
        messages = [Message(role="system" if m.role == "developer" else m.role, content=m.text())
                    for m in request.messages]  # fmt: skip
        prompt = package.chat_prompt(messages)
        budget = _budget(package, prompt, request.requested_tokens(), "messages")
        completion_id, created = new_id("chatcmpl"), now()
        base = {"id": completion_id, "created": created, "model": loaded.name, "system_fingerprint": loaded.version}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                _chat_stream(package, prompt, budget, base, include_usage), media_type="text/event-stream"
            )
        result = package.complete(prompt, budget)
        usage = Usage.of(result.prompt_tokens, result.completion_tokens)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": usage.model_dump()}  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    def completions(request: CompletionRequest) -> dict | StreamingResponse:
        loaded = model_for(request.model)
        package = loaded.package
        try:
            text = request.prompt_text()
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from error
        prompt = package.text_prompt(text)
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        budget = _budget(package, prompt, request.requested_tokens(), "prompt")
        base = {"id": new_id("cmpl"), "created": now(), "model": loaded.name, "system_fingerprint": loaded.version}
        if request.stream:
            return StreamingResponse(_completion_stream(package, prompt, budget, base), media_type="text/event-stream")
        result = package.complete(prompt, budget)
        usage = Usage.of(result.prompt_tokens, result.completion_tokens)
        return {**base, "object": "text_completion",
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": usage.model_dump()}  # fmt: skip

    return app


def _chat_stream(
    package: ChatPackage, prompt: list[int], budget: int, base: dict[str, Any], include_usage: bool
) -> Iterator[str]:
    chunk = {**base, "object": "chat.completion.chunk"}
    yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]})  # fmt: skip
    generated = 0
    for token in package.stream(prompt, budget):
        generated += 1
        if token.text:
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": token.text}, "finish_reason": None}]})
    finish = finish_reason(generated, budget)
    yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if include_usage:
        usage = Usage.of(len(prompt), generated)
        yield _sse({**chunk, "choices": [], "usage": usage.model_dump()})
    yield _sse("[DONE]")


def _completion_stream(package: ChatPackage, prompt: list[int], budget: int, base: dict[str, Any]) -> Iterator[str]:
    chunk = {**base, "object": "text_completion"}
    generated = 0
    for token in package.stream(prompt, budget):
        generated += 1
        if token.text:
            yield _sse({**chunk, "choices": [{"index": 0, "text": token.text, "logprobs": None,
                                              "finish_reason": None}]})  # fmt: skip
    finish = finish_reason(generated, budget)
    yield _sse({**chunk, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}]})
    yield _sse("[DONE]")
