"""What the server reports at `/metrics`, in Prometheus' text format (prometheus-client), named after vLLM's
metrics so that existing dashboards translate: requests by endpoint and status, requests running, prompt and
generated tokens, time to first token, inter-token latency and whole-request latency, each labelled with the
model that served it.

Each app owns its registry, so two servers in one process (tests) do not share counters. Requests are counted by
`CountedRequests`, a middleware, so that refusals made before any route runs are counted too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette import types as asgi

from serving.decoding import Piece

# vLLM's buckets, cut to what a CPU server sees (ms to tens of seconds).
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "trainonce_requests", "HTTP requests answered.", ["endpoint", "status"], registry=registry
        )
        self.running = Gauge(
            "trainonce_requests_running", "Generation requests being decoded now.", ["model"], registry=registry
        )
        self.waiting = Gauge(
            "trainonce_requests_waiting", "Sequences queued for the decode batch.", ["model"], registry=registry
        )
        self.batch_rows = Gauge(
            "trainonce_batch_rows", "Sequences in the decode batch at the last step.", ["model"], registry=registry
        )
        self.prompt_tokens = Counter("trainonce_prompt_tokens", "Prompt tokens read.", ["model"], registry=registry)
        self.generation_tokens = Counter(
            "trainonce_generation_tokens", "Tokens generated.", ["model"], registry=registry
        )
        self.first_token = Histogram(
            "trainonce_time_to_first_token_seconds",
            "From the request's start to its first generated token.",
            ["model"],
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "trainonce_inter_token_latency_seconds",
            "Between consecutive generated tokens of one sequence.",
            ["model"],
            buckets=_PER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_latency = Histogram(
            "trainonce_e2e_request_latency_seconds",
            "From the request's start to its last generated token.",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )

    async def observed(self, model: str, pieces: AsyncIterator[Piece], started: float) -> AsyncIterator[Piece]:
        """`pieces` of one choice, passed through while their timing and counts are recorded; `started` is the
        request's `time.perf_counter()` at its arrival."""
        last = None
        async for piece in pieces:
            now = time.perf_counter()
            if piece.tokens:
                if last is None:
                    self.first_token.labels(model).observe(now - started)
                else:
                    for _ in piece.tokens:
                        self.inter_token.labels(model).observe((now - last) / len(piece.tokens))
                last = now
            self.generation_tokens.labels(model).inc(len(piece.tokens))
            yield piece
        self.request_latency.labels(model).observe(time.perf_counter() - started)


class CountedRequests:
    """Counts every answered request by path and status; a path not in `paths` (an unknown one, or one with a
    parameter such as /v1/models/{model}) counts as `other`, so that a scanner cannot create a series per URL it
    tries."""

    def __init__(self, app: asgi.ASGIApp, metrics: ServingMetrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        async def counted(message: asgi.Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
