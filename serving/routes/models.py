"""OpenAI's model endpoints: /v1/models lists every member of the family, /v1/models/{model} retrieves one (by
name, `name@alias` or `name/version`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from serving.dependencies import NamedModel, ServedFamily, authorize
from serving.errors import error_responses
from serving.model_source import LoadedModel
from serving.response_models import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(authorize)])


@router.get("/v1/models", responses=error_responses(401))
async def models(family: ServedFamily) -> ModelList:
    return ModelList(data=[_card(source.current) for source in family.sources])


@router.get("/v1/models/{model:path}", responses=error_responses(401, 404))
async def retrieve_model(loaded: NamedModel) -> ModelCard:
    return _card(loaded)


def _card(loaded: LoadedModel) -> ModelCard:
    return ModelCard(
        id=loaded.name,
        created=loaded.loaded_at,
        version=loaded.version,
        quantization=loaded.package.config.quantization,
        context_length=loaded.package.config.max_seq_len,
        ms_per_token=round(loaded.ms_per_token, 3),
    )
