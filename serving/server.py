"""Start the OpenAI-compatible server: `trainonce serve --model trainonce-chat --alias champion --port 8000`
(`--also trainonce-chat-small` serves a family's other members behind the same endpoint)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from serving.app import create_app
from serving.batching import DEFAULT_BATCHING, Batching
from serving.family import Family
from serving.model_source import ModelSource

API_KEY_ENV = "TRAINONCE_API_KEY"


def serve(
    workdir: str,
    names: list[str],
    alias: str | None,
    version: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    poll_seconds: float = 5.0,
    threads: int = 0,
    cache_dir: str | None = None,
    batching: Batching = DEFAULT_BATCHING,
) -> None:
    """Load the models the registry names (a family's members: each followed on its own `alias`, or one model
    at a fixed `version`) and serve them until interrupted.

    Binds 127.0.0.1 unless told otherwise; with an API key (argument or TRAINONCE_API_KEY) every /v1 route
    requires `Authorization: Bearer <key>`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if version is not None and len(names) > 1:
        raise ValueError("a fixed version names one model: serve a family by alias")
    cache = cache_dir or Path(workdir) / "serving-cache"
    family = Family([ModelSource(workdir, n, alias, version, cache, poll_seconds, threads, batching) for n in names])
    family.start()
    try:
        uvicorn.run(create_app(family, api_key or os.environ.get(API_KEY_ENV) or None), host=host, port=port)
    finally:
        family.stop()
