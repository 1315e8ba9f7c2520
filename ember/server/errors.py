"""HTTP errors in each dialect's own shape.

Handlers raise `APIError` (or let an `EmberError` escape); the app turns it into the body and status the client
library of that dialect expects. The dialect is chosen by path: /v1/... speaks OpenAI, everything else Ollama.

| raised                  | status | Ollama body          | OpenAI error.type       | OpenAI error.code        |
|-------------------------|--------|----------------------|-------------------------|--------------------------|
| APIError(400, ...)      | 400    | {"error": message}   | invalid_request_error   | as given (or null)       |
| InvalidParameterError   | 400    | {"error": message}   | invalid_request_error   | null                     |
| TemplateError           | 400    | {"error": message}   | invalid_request_error   | null                     |
| UnsupportedError        | 400    | {"error": message}   | invalid_request_error   | null                     |
| ContextOverflowError    | 400    | {"error": message}   | invalid_request_error   | context_length_exceeded  |
| unauthorized            | 401    | {"error": message}   | invalid_request_error   | invalid_api_key          |
| ModelNotFoundError      | 404    | {"error": message}   | invalid_request_error   | model_not_found          |
| body too large          | 413    | {"error": message}   | invalid_request_error   | request_too_large        |
| ServerBusyError         | 503    | {"error": message}   | server_error            | server_busy              |
| GGUFError, EmberError   | 500    | {"error": message}   | server_error            | null                     |
"""
from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from ember.errors import (
    ContextOverflowError,
    EmberError,
    InvalidParameterError,
    ModelNotFoundError,
    TemplateError,
    UnsupportedError,
)


class ServerBusyError(EmberError):
    """The server cannot take the request now (queue full, every loaded model busy): retry later."""


class APIError(Exception):
    """An HTTP error with a one-line message; `code`/`param` feed OpenAI's error object."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


# EmberError subclass -> (status, OpenAI code); the first matching row wins, so subclasses come first.
_EMBER_ERRORS: tuple[tuple[type[EmberError], int, str | None], ...] = (
    (ModelNotFoundError, 404, "model_not_found"),
    (ContextOverflowError, 400, "context_length_exceeded"),
    (InvalidParameterError, 400, None),
    (TemplateError, 400, None),
    (UnsupportedError, 400, None),
    (ServerBusyError, 503, "server_busy"),
    (EmberError, 500, None),
)

_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as an APIError; unknown ones are a 500 that names the exception type, not its traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EmberError):
        for kind, status, code in _EMBER_ERRORS:
            if isinstance(exc, kind):
                return APIError(status, str(exc), code)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, err: APIError) -> dict[str, Any]:
    if is_openai_path(path):
        return {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "server_error"),
                          "param": err.param, "code": err.code}}
    return {"error": err.message}


def error_response(path: str, exc: BaseException, headers: dict[str, str] | None = None) -> Response:
    err = as_api_error(exc)
    body = json.dumps(error_body(path, err)).encode()
    return Response(body, status_code=err.status, media_type="application/json", headers=headers)
