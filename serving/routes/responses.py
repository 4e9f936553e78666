"""/v1/responses: OpenAI's Responses API, as vLLM serves it for a model without tools: the input messages (after
the instructions) rendered in the model's own chat format, one output message, whole or streamed as the
Responses API's events (serving/responses_api.py). Nothing is stored, so `previous_response_id` is refused: a
client sends the conversation so far as `input` instead."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from serving import generation
from serving.dependencies import Metrics, ServedFamily, authorize, requested_model
from serving.protocol import ResponsesRequest
from serving.response_models import ResponseObject
from serving.responses import LogprobFormat
from serving.responses_api import ResponsesAnswer

router = APIRouter(dependencies=[Depends(authorize)])


@router.post("/v1/responses", response_model=ResponseObject, responses=generation.RESPONSES)
async def create_response(
    request: ResponsesRequest, http: Request, response: Response, family: ServedFamily, metrics: Metrics
) -> ResponseObject | StreamingResponse:
    loaded = requested_model(request, http, family)
    package = loaded.package
    params = generation.sampling(request, package)
    prompt = package.chat_prompt(request.messages())
    budget = generation.token_budget(package, prompt, request.requested_tokens(), "input")
    decoding = await generation.start(loaded, [(prompt, budget)], params, 1, metrics, "resp_")
    written = ResponsesAnswer(
        request,
        params,
        LogprobFormat(package, request.return_tokens_as_token_ids),
        decoding.prompt_tokens,
        decoding.choices[0],
        decoding.streams[0],
        decoding.base,
    )
    return await generation.answer(decoding, request.stream, written.whole, written.events, metrics, response)
