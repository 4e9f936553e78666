"""The OpenAI-compatible HTTP API over a family of models (serving/family.py; often one): /health, /metrics
(Prometheus), /v1/models, /v1/models/{model}, /v1/completions, /v1/chat/completions (with SSE streaming ending in
`data: [DONE]`; image_url parts for a model that reads images), /v1/responses (OpenAI's Responses API, streamed as
its typed events), /v1/images/generations (drawings as PNGs, for a model that draws). A request names a member,
or sets a latency budget and is routed to the best member that fits.

`create_app` only assembles the app: its state, its error handling (serving/errors.py), the request counter, and
one router per endpoint group (serving/routes/).
"""

from __future__ import annotations

from fastapi import FastAPI

from serving.errors import install_error_handling
from serving.family import Family
from serving.metrics import CountedRequests, ServingMetrics
from serving.routes import chat, completions, health, images, models, responses

ROUTERS = (health.router, models.router, chat.router, completions.router, responses.router, images.router)


def create_app(family: Family, api_key: str | None = None) -> FastAPI:
    """The app serving `family`; with `api_key`, every /v1 route requires `Authorization: Bearer <key>`."""
    app = FastAPI(
        title="trainonce",
        description="OpenAI-compatible API over a registered trainonce-chat model",
    )
    app.state.family, app.state.metrics, app.state.api_key = family, ServingMetrics(), api_key
    install_error_handling(app)
    # counted by name: each route's path without a parameter (any other path counts as `other`); added after the
    # error handling, so that it wraps the last resort and counts its 500s
    paths = {route.path for router in ROUTERS for route in router.routes if "{" not in route.path}
    app.add_middleware(CountedRequests, metrics=app.state.metrics, paths=paths)
    for router in ROUTERS:
        app.include_router(router)
    return app
