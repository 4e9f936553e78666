"""/v1/completions: OpenAI's legacy text completions, one prompt per request, continued as plain text."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from serving import generation
from serving.dependencies import Metrics, ServedFamily, authorize, requested_model
from serving.errors import ApiError
from serving.protocol import CompletionRequest
from serving.response_models import Completion
from serving.responses import COMPLETION_SHAPE

router = APIRouter(dependencies=[Depends(authorize)])


@router.post("/v1/completions", response_model=Completion, responses=generation.RESPONSES)
def completions(
    request: CompletionRequest, http: Request, response: Response, family: ServedFamily, metrics: Metrics
) -> Completion | StreamingResponse:
    loaded = requested_model(request, http, family)
    package = loaded.package
    params = generation.sampling(request, package)
    try:
        text = request.prompt_text()
    except ValueError as error:
        raise ApiError(400, str(error), "prompt", "unsupported_value") from error
    prompt = package.text_prompt(text)
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", "prompt", "empty_prompt")
    budget = generation.token_budget(package, prompt, request.requested_tokens(), "prompt")
    return generation.respond(request, loaded, prompt, budget, params, COMPLETION_SHAPE, metrics, response)
