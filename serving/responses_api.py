"""The Responses API's answer (`POST /v1/responses`): one output message, whole as OpenAI's Response object, or
streamed as the Responses API's typed server-sent events, in the order OpenAI and vLLM send them:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (one per decoded piece), response.output_text.done, response.content_part.done,
    response.output_item.done, response.completed

each as `event: <type>` and `data: <json with type and sequence_number>`, with no `[DONE]` after them. As vLLM
does, the last event is `response.completed` also when the output stopped at `max_output_tokens`: its response
then says `status: incomplete` (OpenAI sends `response.incomplete`, which the `openai` client's
`responses.stream()` cannot finish on).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from models.sampling import SampledToken, SamplingParams
from serving.decoding import Piece, SequenceDecoder
from serving.protocol import ResponsesRequest
from serving.response_models import ResponseObject, ResponseOutputMessage, ResponseStatus, ResponseUsage
from serving.responses import LogprobFormat


class ResponsesAnswer:
    """The answer to one Responses API request: its one choice (`decoder`, decoding into `stream`) written as a
    Response object, whole or as events."""

    def __init__(
        self,
        request: ResponsesRequest,
        params: SamplingParams,
        logprobs: LogprobFormat,
        prompt_tokens: int,
        decoder: SequenceDecoder,
        stream: AsyncIterator[Piece],
        base: dict[str, Any],
    ) -> None:
        self.request, self.params, self.logprobs = request, params, logprobs
        self.prompt_tokens, self.decoder, self.stream, self.base = prompt_tokens, decoder, stream, base
        self.item_id = f"msg_{uuid.uuid4().hex[:24]}"

    async def whole(self) -> ResponseObject:
        pieces = [piece async for piece in self.stream]
        return self._response([self._message(pieces)])

    async def events(self) -> AsyncGenerator[str, None]:
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(numbers), **fields})}\n\n"

        started = self._response([]).model_dump()
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        item = {"id": self.item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield event("response.content_part.added", **at, part=_text_part("", []))
        pieces = []
        async for piece in self.stream:
            pieces.append(piece)
            yield event("response.output_text.delta", **at, delta=piece.text, logprobs=self._logprobs(piece.tokens))
        message = self._message(pieces)
        part = message.content[0].model_dump()
        yield event("response.output_text.done", **at, text=part["text"], logprobs=part["logprobs"])
        yield event("response.content_part.done", **at, part=part)
        yield event("response.output_item.done", output_index=0, item=message.model_dump())
        yield event("response.completed", response=self._response([message]).model_dump())

    def _logprobs(self, tokens: tuple[SampledToken, ...] | list[SampledToken]) -> list[dict[str, Any]]:
        """Each token's entry, as a chat completion reports it, when the request included them; else none."""
        return self.logprobs.chat(tokens)["content"] if self.params.logprobs is not None else []

    def _status(self) -> ResponseStatus:
        return "incomplete" if self.decoder.finish_reason == "length" else "completed"

    def _message(self, pieces: list[Piece]) -> ResponseOutputMessage:
        text = "".join(p.text for p in pieces)
        content = _text_part(text, self._logprobs([t for p in pieces for t in p.tokens]))
        return ResponseOutputMessage(id=self.item_id, status=self._status(), content=[content])

    def _response(self, output: list[ResponseOutputMessage]) -> ResponseObject:
        """The Response object: in progress until its message is complete, then with its status and usage."""
        done = bool(output)
        status = self._status() if done else "in_progress"
        request, produced = self.request, self.decoder.completion_tokens
        usage = ResponseUsage(
            input_tokens=self.prompt_tokens, output_tokens=produced, total_tokens=self.prompt_tokens + produced
        )
        return ResponseObject(
            id=self.base["id"],
            created_at=self.base["created"],
            model=self.base["model"],
            status=status,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            temperature=self.params.temperature,
            top_p=self.params.top_p,
            metadata=request.metadata,
            output=output,
            usage=usage if done else None,
        )


def _text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
