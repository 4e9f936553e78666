"""The OpenAI-compatible HTTP API over a family of models (serving/family.py; often one): /health, /metrics
(Prometheus), /v1/models, /v1/models/{model}, /v1/completions, /v1/chat/completions (with SSE streaming ending in
`data: [DONE]`). A request names a member, or sets a latency budget and is routed to the best member that fits.

Endpoints are plain functions, so FastAPI runs them in its thread pool: onnxruntime sessions are
thread-safe and release the GIL, so concurrent requests decode in parallel. Each request takes the model
it will use once, at its start, which is what makes a hot swap safe for requests already running.

Every refusal and failure answers OpenAI's error object (`ErrorResponse`), as the OpenAPI document declares,
so the `openai` client raises its typed errors with `param` and `code` set.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette import types as asgi
from starlette.exceptions import HTTPException

from models.chat_format import Message
from models.sampling import SamplingParams
from serving.batching import QueueFull
from serving.decoding import Piece, SequenceDecoder
from serving.engine import ChatPackage
from serving.family import Family
from serving.metrics import ServingMetrics
from serving.model_source import LoadedModel
from serving.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, error_body, new_id, now
from serving.responses import CHAT_SHAPE, COMPLETION_SHAPE, ResponseShape, new_choices

log = logging.getLogger("trainonce.serving")

LATENCY_HEADER = "X-Max-Ms-Per-Token"  # a latency budget, for clients that cannot add body fields
SERVED_BY_HEADER = "X-Trainonce-Model"  # the member that answered (also the response's `model`)

_ERROR_RESPONSES = {
    400: "The request is invalid; `param` names the field at fault.",
    401: "The API key is missing or wrong.",
    404: "The model does not exist on this server.",
    429: "Too many requests are waiting to be decoded; retry shortly.",
    "default": "Any other refusal or failure, in the same shape.",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses`: its refusals, in OpenAI's error shape. Declaring `default` also drops
    FastAPI's 422, which this server never answers (validation errors are 400s, as OpenAI's are)."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_RESPONSES[status]} for status in (*statuses, "default")
    }


class ApiError(Exception):
    """A request the server refuses, answered with OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _budget(package: ChatPackage, prompt: list[int], requested: int | None, prompt_param: str) -> int:
    """How many tokens to generate: the request's max_tokens checked against the context left after the prompt."""
    limit = package.config.max_seq_len
    room = package.room_for(prompt)
    if room < 1:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt)}. Shorten it.",
            prompt_param,
            "context_length_exceeded",
        )
    if requested is None:
        return min(package.config.default_max_new_tokens, room)
    if not 1 <= requested <= room:
        raise ApiError(
            400,
            f"max_tokens={requested} is out of range: it must be in [1, {room}] (the "
            f"{limit}-token context minus the {len(prompt)}-token prompt).",
            "max_tokens",
        )
    return requested


class _ServerErrorAsJson:
    """Last resort: an unexpected exception answers OpenAI's error object with a 500. Starlette's own 500
    handler answers plain text and re-raises, and uvicorn then drops the connection without `Connection:
    close`, so a keep-alive client's next request fails; this answers and keeps the connection."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        started = False

        async def tracked(message: asgi.Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if scope["type"] != "http" or started:  # mid-stream there is no sound answer left to give
                raise
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            body = error_body("The server had an error while processing your request.", None, None, "server_error")
            await JSONResponse(body, 500)(scope, receive, send)


class _CountedRequests:
    """Counts every answered request by route and status (unknown paths as `other`, so that a scanner cannot
    create a series per URL it tries)."""

    def __init__(self, app: asgi.ASGIApp, metrics: ServingMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.routes else "other"

        async def counted(message: asgi.Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def create_app(family: Family, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="trainonce", description="OpenAI-compatible API over a registered trainonce-chat model")
    metrics = ServingMetrics()
    app.add_middleware(_ServerErrorAsJson)
    routes = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    app.add_middleware(_CountedRequests, metrics=metrics, routes=routes)

    @app.exception_handler(ApiError)
    def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.param, error.code, error.kind), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("The request body is not valid JSON.", None, "invalid_json"), 400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if param is None:  # the body itself failed: null, an array, a string or a number
            return JSONResponse(error_body("The request body must be a JSON object.", None, "invalid_value"), 400)
        return JSONResponse(error_body(f"{param}: {first.get('msg')}", param, "invalid_value"), 400)

    @app.exception_handler(HTTPException)
    def _refused_by_starlette(request: Request, error: HTTPException) -> JSONResponse:
        """Refusals made before an endpoint runs: no such route, wrong method, a body FastAPI cannot parse."""
        route = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            body = error_body(f"Invalid URL ({route}): no such route.", None, "unknown_url")
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            body = error_body(f"Method not allowed ({route}); allowed: {allowed}.", None, "method_not_allowed")
        elif error.status_code == 400:  # json.loads failed other than on syntax (those are validation errors)
            body = error_body(
                "The request body is not JSON this server can parse: not UTF-8, nested too deeply, "
                "or a number too long.",
                None,
                "invalid_json",
            )
        else:
            body = error_body(str(error.detail), None, None)
        return JSONResponse(body, error.status_code, headers=error.headers)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key", "authentication_error")

    def model_for(requested: str, max_ms_per_token: float | None = None) -> LoadedModel:
        """The model a request runs on, taken once (it finishes on this version even if the alias moves): the
        member it names or, with a latency budget, the best member of the family that fits."""
        named = family.named(requested)
        if named is None:
            raise ApiError(
                404,
                f"The model {requested!r} does not exist; this server serves {', '.join(map(repr, family.names))}.",
                "model",
                "model_not_found",
            )
        if max_ms_per_token is None:
            return named.loaded
        routed = family.within(max_ms_per_token)
        if routed is None:
            fastest = family.fastest()
            raise ApiError(
                400,
                f"max_ms_per_token={max_ms_per_token:g}: no model fits; the fastest, {fastest.name!r}, takes "
                f"{fastest.ms_per_token:.2f} ms per token on this server.",
                "max_ms_per_token",
                "latency_budget_unmet",
            )
        return routed.loaded

    def latency_budget(request: ChatCompletionRequest | CompletionRequest, http: Request) -> float | None:
        """The request's `max_ms_per_token`, from its body or its `X-Max-Ms-Per-Token` header."""
        header = http.headers.get(LATENCY_HEADER)
        if request.max_ms_per_token is not None or header is None:
            return request.max_ms_per_token
        try:
            budget = float(header)
        except ValueError:
            budget = -1.0
        if not budget > 0:
            raise ApiError(
                400, f"{LATENCY_HEADER}: must be a number of milliseconds > 0, got {header!r}", LATENCY_HEADER
            )
        return budget

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        for member in family.sources:
            loaded = member.current
            if loaded.batcher is not None:
                metrics.waiting.labels(loaded.name).set(loaded.batcher.waiting)
                metrics.batch_rows.labels(loaded.name).set(loaded.batcher.running)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def decoding(loaded: LoadedModel, prompt: list[int], choices: list[SequenceDecoder]) -> list[Iterator[Piece]]:
        """Start this request's choices on its model (refused with a 429 if the batch queue is full), timed and
        counted per model."""
        started = time.perf_counter()
        try:
            streams = loaded.decode(choices)
        except QueueFull as error:
            raise ApiError(
                429, f"The server is busy ({error}); retry shortly.", None, "queue_full", "server_busy"
            ) from error
        metrics.prompt_tokens.labels(loaded.name).inc(len(prompt))
        return [metrics.observed(loaded.name, stream, started) for stream in streams]

    def running(model: str, events: Iterator[str]) -> Iterator[str]:
        with metrics.running.labels(model).track_inprogress():
            yield from events

    def respond(
        request: ChatCompletionRequest | CompletionRequest,
        loaded: LoadedModel,
        prompt: list[int],
        budget: int,
        params: SamplingParams,
        response: Response,
        shape: ResponseShape,
    ) -> dict | StreamingResponse:
        """Decode the request's choices on its model and answer in the endpoint's shape, whole or streamed."""
        package = loaded.package
        choices = new_choices(package, prompt, budget, params, request.n)
        base = {
            "id": new_id(shape.id_prefix),
            "created": now(),
            "model": loaded.name,
            "system_fingerprint": loaded.version,
        }
        streams = decoding(loaded, prompt, choices)
        if request.stream:
            events = shape.streamed(package, prompt, choices, streams, base, request.include_usage())
            return StreamingResponse(
                running(loaded.name, events), media_type="text/event-stream", headers={SERVED_BY_HEADER: loaded.name}
            )
        response.headers[SERVED_BY_HEADER] = loaded.name
        with metrics.running.labels(loaded.name).track_inprogress():
            return shape.whole(package, prompt, choices, streams, base)

    @app.get("/health")
    def health() -> dict:
        """The first member at the top level (a one-model server's shape), every member under `members`."""
        members = [
            {
                "model": s.name,
                "version": s.current.version,
                "reference": s.reference,
                "ms_per_token": s.current.ms_per_token,
            }
            for s in family.sources
        ]
        first = members[0]
        return {
            "status": "ok",
            "model": first["model"],
            "version": first["version"],
            "reference": first["reference"],
            "members": members,
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=_errors(401))
    def models() -> dict:
        return {"object": "list", "data": [_card(s.current) for s in family.sources]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)], responses=_errors(401, 404))
    def retrieve_model(model: str) -> dict:
        return _card(model_for(model))

    def sampling(request: ChatCompletionRequest | CompletionRequest, package: ChatPackage) -> SamplingParams:
        """The request's decoding controls, refused before any decoding if this model cannot honour them."""
        unsupported = request.unsupported_parameter()
        if unsupported is not None:
            raise ApiError(400, f"{unsupported} is not supported by this server.", unsupported, "unsupported_parameter")
        params = request.sampling(request.requested_logprobs())
        vocab = package.config.vocab_size
        for param, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ApiError(400, f"{param}: token ids must be in [0, {vocab - 1}]; got {outside[:5]}", param)
        return params

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(authorize)],
        response_model=None,
        responses=_errors(400, 401, 404, 429),
    )
    def chat_completions(request: ChatCompletionRequest, http: Request, response: Response) -> dict | StreamingResponse:
        loaded = model_for(request.model, latency_budget(request, http))
        package = loaded.package
        params = sampling(request, package)
        messages = [
            Message(role="system" if m.role == "developer" else m.role, content=m.text()) for m in request.messages
        ]
        prompt = package.chat_prompt(messages)
        budget = _budget(package, prompt, request.requested_tokens(), "messages")
        return respond(request, loaded, prompt, budget, params, response, CHAT_SHAPE)

    @app.post(
        "/v1/completions", dependencies=[Depends(authorize)], response_model=None, responses=_errors(400, 401, 404, 429)
    )
    def completions(request: CompletionRequest, http: Request, response: Response) -> dict | StreamingResponse:
        loaded = model_for(request.model, latency_budget(request, http))
        package = loaded.package
        params = sampling(request, package)
        try:
            text = request.prompt_text()
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from error
        prompt = package.text_prompt(text)
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        budget = _budget(package, prompt, request.requested_tokens(), "prompt")
        return respond(request, loaded, prompt, budget, params, response, COMPLETION_SHAPE)

    return app


def _card(loaded: LoadedModel) -> dict[str, Any]:
    """OpenAI's model object, with what a client needs to size its requests."""
    return {
        "id": loaded.name,
        "object": "model",
        "created": loaded.loaded_at,
        "owned_by": "trainonce",
        "version": loaded.version,
        "quantization": loaded.package.config.quantization,
        "context_length": loaded.package.config.max_seq_len,
        "ms_per_token": round(loaded.ms_per_token, 3),  # measured at load: what a latency budget is routed on
    }
