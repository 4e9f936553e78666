"""What watches the server, outside the API key: /health (each member's version serving now, which is how a
deployment waits for the server and a hot swap is seen) and /metrics (Prometheus' text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.dependencies import Metrics, ServedFamily
from serving.model_source import ModelSource
from serving.response_models import Health, HealthMember

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(family: ServedFamily, metrics: Metrics) -> Response:
    for member in family.sources:
        loaded = member.current
        if loaded.batcher is not None:
            metrics.waiting.labels(loaded.name).set(loaded.batcher.waiting)
            metrics.batch_rows.labels(loaded.name).set(loaded.batcher.running)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
def health(family: ServedFamily) -> Health:
    """The first member at the top level (a one-model server's shape), every member under `members`."""
    members = [_member(source) for source in family.sources]
    first = members[0]
    return Health(model=first.model, version=first.version, reference=first.reference, members=members)


def _member(source: ModelSource) -> HealthMember:
    loaded = source.current  # once: a swap between two reads would mix two versions
    return HealthMember(
        model=source.name, version=loaded.version, reference=source.reference, ms_per_token=loaded.ms_per_token
    )
