"""The bodies of the non-streamed answers, typed: each is its route's `response_model`, so the OpenAPI document
shows it and FastAPI checks what a route returns against it. OpenAI's model list and card, chat completion, text
completion and the Responses API's response, field for field what the `openai` client parses (the model card adds
what a client needs to size its requests and to choose by latency), and the server's own /health.

Every field is always present, `null` where OpenAI's is (a choice's `logprobs` when none were asked for).
Streamed chunks are not modelled here: serving/responses.py and serving/responses_api.py write them as server-sent
events.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Answer(BaseModel):
    # every field is always sent, those with a default too: the schema says so (`required`)
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class HealthMember(_Answer):
    model: str
    version: str = Field(description="The registered version serving now: it changes when the alias moves.")
    reference: str = Field(description="What the server follows: `name@alias`, or `name/version` when pinned.")
    ms_per_token: float = Field(description="Decode latency measured at load: what a latency budget is routed on.")


class Health(_Answer):
    status: Literal["ok"] = "ok"
    model: str
    version: str
    reference: str
    members: list[HealthMember]


class ModelCard(_Answer):
    """OpenAI's model object, with what a client needs to size its requests."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When this version was loaded (Unix seconds).")
    owned_by: str = "trainonce"
    version: str
    quantization: str = Field(description="fp32, int8 or int4.")
    context_length: int = Field(description="Prompt and generated tokens together.")
    ms_per_token: float = Field(description="Decode latency measured at load: what a latency budget is routed on.")


class ModelList(_Answer):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length"]


class _Generated(_Answer):
    """What every answer of one request carries, each streamed chunk too."""

    id: str
    created: int
    model: str = Field(description="The member that answered (also the `X-Trainonce-Model` header).")
    system_fingerprint: str = Field(description="The version of that member that answered.")


class TopLogprob(_Answer):
    token: str
    logprob: float
    bytes: list[int]


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatCompletionLogprobs(_Answer):
    content: list[ChatCompletionTokenLogprob]
    refusal: None


class ChatCompletionMessage(_Answer):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(_Answer):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Generated):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: Usage


class CompletionLogprobs(_Answer):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null only for an echoed prompt's first token.")
    top_logprobs: list[dict[str, float] | None] = Field(description="null only for an echoed prompt's first token.")
    text_offset: list[int] = Field(description="Each token's offset in the completion's text.")


class CompletionChoice(_Answer):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(_Generated):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class ResponseOutputText(_Answer):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict] = Field(description="Always empty: this server cites nothing.")
    logprobs: list[ChatCompletionTokenLogprob] = Field(
        description="The text's tokens with their log-probabilities when `include` asks for them; else empty."
    )


ResponseStatus = Literal["in_progress", "completed", "incomplete"]


class ResponseOutputMessage(_Answer):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ResponseStatus
    content: list[ResponseOutputText]


class InputTokensDetails(_Answer):
    cached_tokens: int = Field(0, description="Always 0: no prompt cache is kept between requests.")


class OutputTokensDetails(_Answer):
    reasoning_tokens: int = Field(0, description="Always 0: the model answers without reasoning first.")


class ResponseUsage(_Answer):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(_Answer):
    reason: Literal["max_output_tokens"]


class TextFormat(_Answer):
    type: Literal["text"] = "text"


class TextConfig(_Answer):
    format: TextFormat = TextFormat()


class ResponseObject(_Answer):
    """OpenAI's Response object (what `client.responses.create` returns), as this server fills it: one output
    message, no tools, nothing stored; the sampling fields say what was used (temperature 0: greedy)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str = Field(description="The member that answered (also the `X-Trainonce-Model` header).")
    status: ResponseStatus = Field(description="`incomplete` when the output stopped at max_output_tokens.")
    error: None = None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    metadata: dict[str, str] | None
    output: list[ResponseOutputMessage]
    usage: ResponseUsage | None = Field(description="null until the response is complete (in streamed events).")
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    store: Literal[False] = Field(False, description="Responses are not stored.")
    text: TextConfig = TextConfig()
    tool_choice: Literal["none"] = "none"
    tools: list[dict] = Field(default_factory=list, description="Always empty: tools are refused.")
    truncation: Literal["disabled"] = "disabled"


class GeneratedImage(_Answer):
    b64_json: str = Field(description="The drawing as a base64 PNG (greyscale: ink bright, background dark).")
    revised_prompt: str | None = Field(None, description="Always null: the prompt is used as given.")


class ImagesResponse(_Answer):
    """OpenAI's images response: one PNG per image asked for."""

    created: int
    data: list[GeneratedImage]
