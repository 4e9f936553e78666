"""Every refusal and failure answers OpenAI's error object (`ErrorResponse`), whatever its status, as the OpenAPI
document declares, so the `openai` client raises its typed errors with `param` and `code` set.

A route refuses by raising `ApiError`. What FastAPI and Starlette refuse before a route runs (a body that does not
validate, no such route, a wrong method) is answered in the same shape by the handlers here, and an exception no
one expects (a server bug) by the last-resort middleware. `install_error_handling` puts them all on an app.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette import types as asgi
from starlette.exceptions import HTTPException

log = logging.getLogger("trainonce.serving")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error or server_error.")
    param: str | None = Field(description="The request field at fault, as a dotted path: messages.0.content.")
    code: str | None = Field(description="A stable name for the error: model_not_found, context_length_exceeded...")


class ErrorResponse(BaseModel):
    """OpenAI's error object: what every refusal and failure answers, whatever its status."""

    error: ErrorDetail


def _error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


class ApiError(Exception):
    """A request the server refuses, answered with OpenAI's error object; `code` is required, so that a client
    can tell refusals apart without parsing messages."""

    def __init__(
        self, status: int, message: str, param: str | None, code: str, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


_ERROR_RESPONSES = {
    400: "The request is invalid; `param` names the field at fault.",
    401: "The API key is missing or wrong.",
    404: "The model does not exist on this server.",
    429: "Too many requests are waiting to be decoded; retry shortly.",
    "default": "Any other refusal or failure, in the same shape.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses`: its refusals, in OpenAI's error shape. Declaring `default` also drops
    FastAPI's 422, which this server never answers (validation errors are 400s, as OpenAI's are)."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_RESPONSES[status]} for status in (*statuses, "default")
    }


def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(error.message, error.param, error.code, error.kind), status_code=error.status)


def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return JSONResponse(_error_body("The request body is not valid JSON.", None, "invalid_json"), 400)
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    if param is None:  # the body itself failed: null, an array, a string or a number
        return JSONResponse(_error_body("The request body must be a JSON object.", None, "invalid_value"), 400)
    return JSONResponse(_error_body(f"{param}: {first.get('msg')}", param, "invalid_value"), 400)


def _refused_by_starlette(request: Request, error: HTTPException) -> JSONResponse:
    """Refusals made before an endpoint runs: no such route, wrong method, a body FastAPI cannot parse."""
    route = f"{request.method} {request.url.path}"
    if error.status_code == 404:
        body = _error_body(f"Invalid URL ({route}): no such route.", None, "unknown_url")
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        body = _error_body(f"Method not allowed ({route}); allowed: {allowed}.", None, "method_not_allowed")
    elif error.status_code == 400:  # json.loads failed other than on syntax (those are validation errors)
        body = _error_body(
            "The request body is not JSON this server can parse: not UTF-8, nested too deeply, or a number too long.",
            None,
            "invalid_json",
        )
    else:
        body = _error_body(str(error.detail), None, f"http_{error.status_code}")
    return JSONResponse(body, error.status_code, headers=error.headers)


class _ServerErrorAsJson:
    """Last resort: an unexpected exception answers OpenAI's error object with a 500. Starlette's own 500
    handler answers plain text and re-raises, and uvicorn then drops the connection without `Connection:
    close`, so a keep-alive client's next request fails; this answers and keeps the connection."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        started = False

        async def tracked(message: asgi.Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if scope["type"] != "http" or started:  # mid-stream there is no sound answer left to give
                raise
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            body = _error_body("The server had an error while processing your request.", None, None, "server_error")
            await JSONResponse(body, 500)(scope, receive, send)


def install_error_handling(app: FastAPI) -> None:
    """The handlers, and the last-resort middleware: middleware added after this one wraps it, and so sees its
    500s."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _refused_by_starlette)
    app.add_middleware(_ServerErrorAsJson)
