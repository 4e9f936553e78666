"""OpenAI's request shapes (the subset trainonce serves), so the `openai` client works unchanged; what the server
answers is typed in serving/response_models.py and serving/errors.py.

Requests ignore fields that do not change what is generated (`user`, `metadata`...); fields that would but
that this server cannot honour (`tools`, `response_format` json...) are refused by name (`UNSUPPORTED`); what
is used is validated here (ranges shared with models.sampling), then against the chosen model's context length
and vocabulary (serving/generation.py), with OpenAI-style error objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from models.chat_format import Message
from models.sampling import (
    MAX_STOP_SEQUENCES,
    LogitBias,
    MinP,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    StopSequence,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
)


def _encodable(texts: list[str]) -> None:
    """JSON may escape a lone surrogate (`"\\ud800"`): a Python str, but not text a tokenizer can encode."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PydanticCustomError(
                "invalid_text", "must be valid Unicode text, without lone surrogates such as \\ud800"
            ) from error


def _served_part(kind: Any, served_kinds: tuple[str, ...], served: str = "text content parts") -> Any:
    """A content part's type, if it is one of the kinds served: pydantic's own message would only say "Input
    should be 'text'", where the client needs to hear which parts (audio, files...) are not served."""
    if kind not in served_kinds:
        raise PydanticCustomError(
            "unsupported_content", "only {served} are supported, not {kind}", {"kind": repr(kind), "served": served}
        )
    return kind


def content_text(parts: list[tuple[str, bool]]) -> str:
    """A message's parts (text, and whether it is an image's token text) as one content string: an image is followed
    by a space when more content follows, `<image>...</image> Which digit is this?`, as the image tasks are written.
    The server's image_url parts and the pyfunc's images column both go through here."""
    return "".join(text + (" " if is_image and j < len(parts) - 1 else "") for j, (text, is_image) in enumerate(parts))


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str = Field(
        min_length=1, description="A data URL (data:image/png;base64,... or image/jpeg); the server fetches nothing."
    )
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted; every image is read at 8x8.")


class ContentPart(BaseModel):
    """A text part, or an image part (`image_url`) that a model with an image tokenizer reads."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _only_text_and_images(cls, kind: Any) -> Any:
        return _served_part(kind, ("text", "image_url"), "text and image_url content parts")

    @model_validator(mode="after")
    def _has_its_content(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("missing_text", "a text part needs `text`")
        if self.type == "image_url" and self.image_url is None:
            raise PydanticCustomError("missing_image_url", "an image_url part needs `image_url`")
        if self.type == "text" and self.image_url is not None:
            raise PydanticCustomError("mixed_part", "a text part carries no `image_url`: send it as its own part")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: list[ContentPart] = Field(description="A string, or a list of text and image_url parts.")

    @field_validator("content", mode="before", json_schema_input_type=str | list[ContentPart])
    @classmethod
    def _as_parts(cls, content: Any) -> Any:
        """A string is one text part: with a single shape to validate (no union), an error names the part at
        fault (`messages.0.content.0.type`), not a union member (`messages.0.content.str`)."""
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    @field_validator("content")
    @classmethod
    def _encodable_content(cls, parts: list[ContentPart]) -> list[ContentPart]:
        _encodable([p.text for p in parts if p.text is not None])
        return parts

    tool_calls: list[Any] | None = Field(
        None, description="Refused when not empty: this model's chat format has no way to show a tool call."
    )

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, tool_calls: list[Any] | None) -> list[Any] | None:
        """An assistant's tool calls cannot be rendered; dropping them would answer a different conversation."""
        if tool_calls:
            raise PydanticCustomError(
                "unsupported_tool_calls", "tool calls are not supported: this model's chat format has no tool calls"
            )
        return tool_calls

    def rendered(self, image_text: Callable[[str, str], str], index: int) -> str:
        """The message's content as the model reads it: text parts as they are, each image part as the text of its
        image tokens, `image_text(url, param)` (param: where the URL is, for a refusal to name), followed by a space
        when more content follows: `<image>...</image> Which digit is this?`, as the image tasks are written."""
        return content_text(
            [
                (image_text(part.image_url.url, f"messages.{index}.content.{j}.image_url.url"), True)
                if part.type == "image_url" and part.image_url is not None
                else (part.text or "", False)
                for j, part in enumerate(self.content)
            ]
        )

    def image_count(self) -> int:
        return sum(part.type == "image_url" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="A last chunk with the request's usage.")
    continuous_usage_stats: bool = Field(
        False, description="With include_usage, every chunk carries the usage so far (vLLM's)."
    )


MAX_CHOICES = 16
BadWord = Annotated[str, Field(min_length=1, max_length=256, pattern=r"\S", description="Not only whitespace.")]


def _inactive(value: Any) -> bool:
    return value in (None, False, "", [], {})


# Parameters that would change what is generated but that this server cannot honour: a request that sets one
# is refused with a 400 naming it, never answered as if it had not been sent. Each maps to the test that
# tells an inactive value (what a client sends by default) from a request for the feature.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(
        (
            "tools",
            "functions",
            "function_call",
            "audio",
            "prediction",
            "web_search_options",
            "reasoning_effort",
            "echo",  # a chat request's (vLLM's): completions declare their own
            "suffix",
        ),
        _inactive,
    ),  # OpenAI's
    **dict.fromkeys(
        (
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "structured_outputs",
            "use_beam_search",
            "prompt_logprobs",
            "continue_final_message",
            "chat_template",
            "chat_template_kwargs",
            "documents",
            "truncate_prompt_tokens",
            "logits_processors",  # names of server-side code to run: none is installed here
        ),
        _inactive,
    ),  # vLLM's extra body
    "priority": lambda v: v in (None, 0),  # requests are scheduled in arrival order, without priorities
    # with no tools (`tools` is refused) both choices mean plain text, which is what is generated
    "tool_choice": lambda v: _inactive(v) or v in ("none", "auto"),
    "response_format": lambda v: _inactive(v) or v == {"type": "text"},
    "modalities": lambda v: _inactive(v) or v == ["text"],
    "add_generation_prompt": lambda v: v is None or v is True,
    "best_of": lambda v: v in (None, 1),
    "length_penalty": lambda v: v in (None, 1, 1.0),
}


class _GenerationRequest(BaseModel):
    """What every generation endpoint shares: the model, streaming, and the sampling controls (OpenAI's, and
    vLLM's extra-body ones), with the ranges of models.sampling."""

    model_config = ConfigDict(extra="allow")  # kept, so that `unsupported_parameter` can see them
    # what this endpoint refuses by name when a request sets it (`unsupported_parameter`)
    _unsupported: ClassVar[dict[str, Callable[[Any], bool]]] = UNSUPPORTED

    model: str
    stream: bool = False
    temperature: Temperature | None = Field(None, description="0 or omitted: greedy (the package's default).")
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    seed: int | None = None
    stop: list[StopSequence] | None = Field(None, max_length=MAX_STOP_SEQUENCES, description="Up to 16 texts.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Token ids that end a choice, besides the end of turn (vLLM's)."
    )
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Only these token ids can be generated (vLLM's)."
    )
    bad_words: list[BadWord] | None = Field(
        None, description="Words never generated, at the start of the text or inside it (vLLM's)."
    )
    skip_special_tokens: bool = Field(True, description="False: special tokens stay in the text (vLLM's).")
    return_tokens_as_token_ids: bool = Field(
        False, description="Log-probability entries name their token `token_id:N` (vLLM's)."
    )
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    max_ms_per_token: float | None = Field(
        None, gt=0, description="A latency budget: served by the best model of the family that fits it."
    )

    @field_validator(
        "stop",
        mode="before",
        json_schema_input_type=StopSequence
        | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]
        | None,
    )
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    def unsupported_parameter(self) -> str | None:
        """The first parameter set that this server cannot honour, if any."""
        extra = self.model_extra or {}
        return next(
            (name for name, inactive in self._unsupported.items() if name in extra and not inactive(extra[name])),
            None,
        )

    def sampling(self, logprobs: int | None, bad_words_ids: tuple[tuple[int, ...], ...] = ()) -> SamplingParams:
        """The request's controls as sampling parameters, with its bad words as tokenized for the model; what it
        leaves out keeps the greedy defaults."""
        fields = self.model_dump(include=set(SamplingParams.model_fields) - {"logprobs"}, exclude_none=True)
        return SamplingParams(**fields, logprobs=logprobs, bad_words_ids=bad_words_ids)


class _ChoicesRequest(_GenerationRequest):
    """What the two completions endpoints add: `n` choices, a budget in `max_tokens`, and usage in the stream
    when asked for."""

    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens to generate, at most the context left after the prompt; default: the package's default.",
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per request, each sampled independently.")
    stream_options: StreamOptions | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Usage in every chunk: vLLM's `continuous_usage_stats`, which counts only with `include_usage`."""
        return self.include_usage() and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_ChoicesRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="The newer name of max_tokens; when both are sent, this one counts."
    )
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = Field(None, description="Alternatives per token; needs logprobs=true.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise PydanticCustomError("logprobs_required", "top_logprobs needs logprobs=true")
        return top_logprobs

    def requested_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = list[Annotated[int, Field(ge=0)]]
# What the OpenAPI document declares a prompt to be: nothing in it may be empty, which the endpoint refuses with
# its own error naming `prompt` (declaring it lets a schema-driven client, such as schemathesis, know)
_Text = Annotated[str, Field(min_length=1)]
_Ids = Annotated[TokenIds, Field(min_length=1)]
PromptInput = _Text | Annotated[list[_Text], Field(min_length=1)] | _Ids | Annotated[list[_Ids], Field(min_length=1)]


class CompletionRequest(_ChoicesRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A text, a list of texts, token ids or a list of token-id lists; each prompt gets its own `n` "
        "choices (prompt i's are choices i*n .. i*n+n-1)."
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens to generate, at most the context left after the prompt; 0 only with echo (the prompt "
        "scored, nothing generated); default: the package's default.",
    )
    echo: bool = Field(
        False,
        description="Each choice's text starts with its prompt (and its logprobs with the "
        "prompt's, the first token's null).",
    )
    logprobs: TopLogprobs | None = Field(None, description="Alternatives per token (0: the chosen token's only).")

    @field_validator("prompt", mode="wrap", json_schema_input_type=PromptInput)
    @classmethod
    def _encodable_prompt(cls, given: Any, validate: ValidatorFunctionWrapHandler) -> Any:
        prompt = validate(given)
        _encodable([p for p in ([prompt] if isinstance(prompt, str) else prompt) if isinstance(p, str)])
        return prompt

    def requested_tokens(self) -> tuple[str, int | None]:
        """The field that sets the budget, as the client named it (for its errors), and its value."""
        return "max_tokens", self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a text or token ids: a list of ints is one prompt, as OpenAI reads it."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ResponseInputPart(BaseModel):
    """A text part of a Responses API input message: `input_text`, or `output_text` in an assistant turn sent
    back as history."""

    model_config = ConfigDict(extra="ignore")  # an output_text's annotations and logprobs say nothing to the model

    type: Literal["input_text", "output_text"]
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _only_text(cls, kind: Any) -> Any:
        return _served_part(kind, ("input_text", "output_text"))


class ResponseInputMessage(BaseModel):
    """A message item of the Responses API's `input` (OpenAI's EasyInputMessage, or an earlier output message
    sent back); items of other types (function calls, reasoning, references to stored items) are refused."""

    model_config = ConfigDict(extra="ignore")  # an earlier output's id and status

    type: Literal["message"] = "message"
    role: Literal["system", "user", "assistant", "developer"]
    content: list[ResponseInputPart] = Field(description="A string, or a list of text parts.")

    @field_validator("type", mode="before")
    @classmethod
    def _only_messages(cls, kind: Any) -> Any:
        if kind != "message":  # the first error is the one reported: this one, not a missing `role`
            raise PydanticCustomError(
                "unsupported_item", "only message items are supported, not {kind}", {"kind": repr(kind)}
            )
        return kind

    @field_validator("content", mode="before", json_schema_input_type=str | list[ResponseInputPart])
    @classmethod
    def _as_parts(cls, content: Any) -> Any:
        return [{"type": "input_text", "text": content}] if isinstance(content, str) else content

    @field_validator("content")
    @classmethod
    def _encodable_content(cls, parts: list[ResponseInputPart]) -> list[ResponseInputPart]:
        _encodable([p.text for p in parts])
        return parts

    def message(self) -> Message:
        """As the chat format renders it: `developer` is OpenAI's newer name for `system`."""
        role = "system" if self.role == "developer" else self.role
        return Message(role=role, content="".join(p.text for p in self.content))


LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _text_format_only(text: Any) -> bool:
    """`text` asks for nothing this server cannot do: no format, or plain text (a JSON schema would be refused)."""
    return _inactive(text) or (isinstance(text, dict) and text.get("format") in (None, {"type": "text"}))


def _no_reasoning(reasoning: Any) -> bool:
    """`reasoning` asks for no effort or summary (this model does not reason before it answers)."""
    return _inactive(reasoning) or (isinstance(reasoning, dict) and not any(reasoning.values()))


# What the Responses API asks for that this server cannot do, besides UNSUPPORTED: stored conversations (no
# response is stored, so `previous_response_id` could only be answered as if it had not been sent), background
# runs, prompt templates, reasoning, structured output, truncation; and the completions endpoints' budget and
# choices, which this endpoint names otherwise (`max_output_tokens`) or does not have (one output).
RESPONSES_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **UNSUPPORTED,
    **dict.fromkeys(("previous_response_id", "conversation", "background", "prompt", "max_tokens"), _inactive),
    "reasoning": _no_reasoning,
    "text": _text_format_only,
    "truncation": lambda v: v in (None, "disabled"),
    "n": lambda v: v in (None, 1),
}


class ResponsesRequest(_GenerationRequest):
    """OpenAI's Responses API (`POST /v1/responses`) as vLLM serves it without tools: one output message from
    `input` (a text, or message items) after `instructions`, sampled with the same controls as the completions
    endpoints. Responses are not stored: `store` is accepted and answered `false`."""

    _unsupported: ClassVar[dict[str, Callable[[Any], bool]]] = RESPONSES_UNSUPPORTED

    input: list[ResponseInputMessage] = Field(min_length=1, description="A text (one user message), or messages.")
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens to generate, at most the context left after the input; default: the package's default.",
    )
    include: list[str] | None = Field(
        None, description=f"`{LOGPROBS_INCLUDE}`: the output text's tokens with their log-probabilities."
    )
    top_logprobs: TopLogprobs | None = Field(None, description=f"Alternatives per token, with `{LOGPROBS_INCLUDE}`.")
    store: bool | None = Field(None, description="Accepted, never honoured: no response is stored.")
    metadata: dict[str, str] | None = Field(None, description="Returned as sent.")

    @field_validator("input", mode="before", json_schema_input_type=str | list[ResponseInputMessage])
    @classmethod
    def _as_messages(cls, given: Any) -> Any:
        return [{"role": "user", "content": given}] if isinstance(given, str) else given

    @field_validator("instructions")
    @classmethod
    def _encodable_instructions(cls, instructions: str | None) -> str | None:
        _encodable([instructions or ""])
        return instructions

    @field_validator("metadata")
    @classmethod
    def _encodable_metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        _encodable([text for item in (metadata or {}).items() for text in item])  # it is sent back in the response
        return metadata

    def messages(self) -> list[Message]:
        instructions = [Message(role="system", content=self.instructions)] if self.instructions else []
        return [*instructions, *(item.message() for item in self.input)]

    def requested_tokens(self) -> tuple[str, int | None]:
        return "max_output_tokens", self.max_output_tokens

    def requested_logprobs(self) -> int | None:
        """As vLLM reads them: log-probabilities only when `include` asks for them, with `top_logprobs`
        alternatives."""
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or []) else None


GenerationRequest = ChatCompletionRequest | CompletionRequest | ResponsesRequest  # what a generation route takes


# What an image request may set that this server cannot honour: refused by name, never ignored.
IMAGE_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "quality": lambda v: v in (None, "auto", "standard"),
    "style": _inactive,
    "background": lambda v: v in (None, "auto", "opaque"),
    "output_format": lambda v: v in (None, "png"),
    "output_compression": lambda v: v is None,
    "partial_images": lambda v: v in (None, 0),
    "stream": lambda v: v in (None, False),
}
IMAGE_SIDES = {"auto": 64, "8x8": 8, "64x64": 64, "256x256": 256}


class ImageGenerationRequest(BaseModel):
    """OpenAI's `images.generate` for a model that draws (one with an image tokenizer): each image is the model's
    answer to `prompt` as a drawing request, its codes sampled at `temperature` (1 by default, so that n images
    differ; 0 is greedy)."""

    model_config = ConfigDict(extra="allow")  # kept, so that `unsupported_parameter` can see them

    model: str
    prompt: str = Field(min_length=1, max_length=1000, description="What to draw, e.g. 'Draw the digit 3.'")
    n: int = Field(1, ge=1, le=10, description="Images to draw.")
    size: Literal["auto", "8x8", "64x64", "256x256"] | None = Field(
        "auto", description="The PNG's size: the drawing is 8x8, scaled up by whole pixels (auto: 64x64)."
    )
    response_format: Literal["b64_json"] | None = Field(
        "b64_json", description="Only b64_json: this server hosts no files to give URLs of."
    )
    temperature: Temperature | None = Field(1.0, description="Sampling temperature of the drawing's codes.")
    seed: int | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _no_urls(cls, value: Any) -> Any:
        if value == "url":
            raise PydanticCustomError(
                "unsupported_response_format", "response_format='url' is not supported: ask for b64_json"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _encodable_prompt(cls, prompt: str) -> str:
        _encodable([prompt])
        return prompt

    def unsupported_parameter(self) -> str | None:
        extra = self.model_extra or {}
        return next((name for name, fine in IMAGE_UNSUPPORTED.items() if name in extra and not fine(extra[name])), None)

    def side(self) -> int:
        return IMAGE_SIDES[self.size or "auto"]
