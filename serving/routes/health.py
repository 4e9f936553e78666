"""What watches the server, outside the API key: /health (each member's version serving now, which is how a
deployment waits for the server and a hot swap is seen) and /metrics (Prometheus' text format).

Both only read state, so they are coroutines, answered on the event loop: as plain functions they would wait for
a free thread of FastAPI's pool (40), which as many concurrent non-streamed generation requests hold until they
finish, and a liveness probe would then kill a server that is only busy."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.dependencies import Metrics, ServedFamily
from serving.model_source import ModelSource
from serving.response_models import Health, HealthMember

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(family: ServedFamily, metrics: Metrics) -> Response:
    for member in family.sources:
        loaded = member.current
        metrics.waiting.labels(loaded.name).set(loaded.batcher.waiting)
        metrics.batch_rows.labels(loaded.name).set(loaded.batcher.running)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(family: ServedFamily) -> Health:
    """The first member at the top level (a one-model server's shape), every member under `members`."""
    members = [_member(source) for source in family.sources]
    first = members[0]
    return Health(model=first.model, version=first.version, reference=first.reference, members=members)


def _member(source: ModelSource) -> HealthMember:
    loaded = source.current  # once: a swap between two reads would mix two versions
    return HealthMember(
        model=source.name, version=loaded.version, reference=source.reference, ms_per_token=loaded.ms_per_token
    )
