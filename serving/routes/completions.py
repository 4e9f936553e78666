"""/v1/completions: OpenAI's legacy text completions, as vLLM serves them: one prompt or many (texts or token
ids, each with its own `n` choices, decoded together), continued as plain text, and with `echo` the prompt
itself with the model's log-probabilities of its tokens (what lm-evaluation-harness scores choices with).

The prompts are tokenized and echoes scored (a forward pass) in a worker thread, off the event loop that writes
every answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from serving import generation
from serving.dependencies import Metrics, ServedFamily, authorize, requested_model
from serving.engine import ChatPackage
from serving.errors import ApiError
from serving.protocol import CompletionRequest
from serving.response_models import Completion
from serving.responses import COMPLETION_SHAPE, Echo

router = APIRouter(dependencies=[Depends(authorize)])


def _prompt_ids(package: ChatPackage, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids: a text encoded, or token ids checked against the vocabulary."""
    ids = package.text_prompt(prompt) if isinstance(prompt, str) else prompt
    if not ids:
        raise ApiError(400, "prompt: must not be empty", "prompt", "empty_prompt")
    vocab = package.config.vocab_size
    outside = [t for t in ids if not 0 <= t < vocab]
    if outside:
        raise ApiError(
            400, f"prompt: token ids must be in [0, {vocab - 1}]; got {outside[:5]}", "prompt", "invalid_token_id"
        )
    return ids


def _echo(package: ChatPackage, request: CompletionRequest, prompt: str | list[int], ids: list[int]) -> Echo:
    """What an echoed choice starts with: the prompt's text (token ids decoded) and, with `logprobs`, its tokens
    scored by one forward pass over the prompt."""
    text = (
        prompt
        if isinstance(prompt, str)
        else package.tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens)
    )
    top = request.logprobs
    return Echo(text, tuple(package.prompt_logprobs(ids, top)) if top is not None else ())


@router.post("/v1/completions", response_model=Completion, responses=generation.RESPONSES)
async def completions(
    request: CompletionRequest, http: Request, response: Response, family: ServedFamily, metrics: Metrics
) -> Completion | StreamingResponse:
    loaded = requested_model(request, http, family)
    params = generation.sampling(request, loaded.package)
    prompts, echoes = await run_in_threadpool(_prompts, loaded.package, request)
    return await generation.respond(request, loaded, prompts, params, COMPLETION_SHAPE, metrics, response, echoes)


def _prompts(package: ChatPackage, request: CompletionRequest) -> tuple[list[tuple[list[int], int]], list[Echo]]:
    """Each prompt's token ids and budget, and with `echo` what each echoed choice starts with."""
    texts = request.prompts()
    if not texts:
        raise ApiError(400, "prompt: must not be empty", "prompt", "empty_prompt")
    prompts = [_prompt_ids(package, text) for text in texts]
    budgets = [
        generation.token_budget(package, ids, request.requested_tokens(), "prompt", request.echo) for ids in prompts
    ]
    echoes = [_echo(package, request, t, ids) for t, ids in zip(texts, prompts, strict=True)] if request.echo else []
    return list(zip(prompts, budgets, strict=True)), echoes
