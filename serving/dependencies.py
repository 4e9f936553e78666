"""What a route takes from its app and its request, as FastAPI dependencies: the app's state (create_app puts the
family, the metrics and the API key on `app.state`, so no route closes over anything), the API key check, and the
model a request runs on.

A request takes its model once, at its start: it finishes on that version even if the alias moves meanwhile,
which is what makes a hot swap safe for requests already running.

None of these blocks, so the dependencies are `async def`: FastAPI calls them on the event loop rather than
sending each to its thread pool.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from serving.errors import ApiError
from serving.family import Family
from serving.metrics import ServingMetrics
from serving.model_source import LoadedModel
from serving.protocol import GenerationRequest

LATENCY_HEADER = "X-Max-Ms-Per-Token"  # a latency budget, for clients that cannot add body fields


async def _family(request: Request) -> Family:
    return request.app.state.family


async def _metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


ServedFamily = Annotated[Family, Depends(_family)]
Metrics = Annotated[ServingMetrics, Depends(_metrics)]


async def authorize(request: Request) -> None:
    """With an API key set, a route that depends on this requires `Authorization: Bearer <key>`."""
    api_key = request.app.state.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key", "authentication_error")


def model_for(family: Family, requested: str, max_ms_per_token: float | None = None) -> LoadedModel:
    """The member `requested` names or, with a latency budget, the best member of the family that fits."""
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


async def _named_model(model: str, family: ServedFamily) -> LoadedModel:
    return model_for(family, model)


NamedModel = Annotated[LoadedModel, Depends(_named_model)]  # the model a path's {model} names


def _latency_budget(request: GenerationRequest, http: Request) -> float | None:
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
            400,
            f"{LATENCY_HEADER}: must be a number of milliseconds > 0, got {header!r}",
            LATENCY_HEADER,
            "invalid_value",
        )
    return budget


def requested_model(request: GenerationRequest, http: Request, family: Family) -> LoadedModel:
    """The model a generation request runs on. Not a dependency: it reads the request's body, which only the
    endpoint declares."""
    return model_for(family, request.model, _latency_budget(request, http))
