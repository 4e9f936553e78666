"""OpenAI request and response shapes (the subset trainonce serves), so the `openai` client works unchanged.

Requests ignore fields they do not use (as OpenAI-compatible servers do); what is used is validated here
and by the app against the loaded model's context length, with OpenAI-style error objects.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


def _encodable(texts: list[str]) -> None:
    """JSON may escape a lone surrogate (`"\\ud800"`): a Python str, but not text a tokenizer can encode."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PydanticCustomError(
                "invalid_text", "must be valid Unicode text, without lone surrogates such as \\ud800"
            ) from error


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _only_text(cls, kind: Any) -> Any:
        if kind != "text":  # pydantic's own message would only say "Input should be 'text'"
            raise PydanticCustomError(
                "unsupported_content", "only text content parts are supported, not {kind}", {"kind": repr(kind)}
            )
        return kind


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: list[ContentPart] = Field(description="A string, or a list of text parts.")

    @field_validator("content", mode="before", json_schema_input_type=str | list[ContentPart])
    @classmethod
    def _as_parts(cls, content: Any) -> Any:
        """A string is one text part: with a single shape to validate (no union), an error names the part at
        fault (`messages.0.content.0.type`), not a union member (`messages.0.content.str`)."""
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    @field_validator("content")
    @classmethod
    def _encodable_content(cls, parts: list[ContentPart]) -> list[ContentPart]:
        _encodable([p.text for p in parts])
        return parts

    def text(self) -> str:
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, description="Tokens to generate; default: the package's default.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request (greedy decoding is deterministic).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Accepted; decoding is greedy.")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _encodable_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        _encodable([prompt] if isinstance(prompt, str) else prompt)
        return prompt

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: exactly one prompt per request is supported")
        return self.prompt[0]


class Usage(BaseModel):
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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error or server_error.")
    param: str | None = Field(description="The request field at fault, as a dotted path: messages.0.content.")
    code: str | None = Field(description="A stable name for the error: model_not_found, context_length_exceeded...")


class ErrorResponse(BaseModel):
    """OpenAI's error object: what every refusal and failure answers, whatever its status."""

    error: ErrorDetail


def error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()
