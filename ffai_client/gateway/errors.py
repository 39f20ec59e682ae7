"""HTTP errors of the gateway and how worker errors map onto them.

One `ApiError` carries what both APIs need: the HTTP status, a message, and
for OpenAI's shape a `type`, `code` and `param` (the offending field). Each
API renders it in its own body (`openai_body`, `ollama_body`).
"""

from __future__ import annotations

from typing import Any

from ffai_client.errors import (
    Busy,
    ClientClosed,
    FFAIError,
    InvalidParameters,
    InvalidRequest,
    PromptTooLong,
    RequestError,
    ShuttingDown,
    TemplateError,
    WorkerUnavailable,
)

RETRY_AFTER_S = 1  # what a busy worker asks clients to wait before retrying


class ApiError(Exception):
    """An HTTP error response: status, message, and OpenAI's type/code/param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


def bad_field(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """400 naming the field that is wrong."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def unsupported(param: str, why: str) -> ApiError:
    """400 for a field this gateway understands but the worker cannot honour yet."""
    return ApiError(
        400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter"
    )


def from_worker(exc: FFAIError, input_field: str = "messages") -> ApiError:
    """The HTTP error for an exception raised by `AsyncClient`."""
    if isinstance(exc, Busy):
        return ApiError(
            429,
            f"the worker is busy (its queue is full); retry in {RETRY_AFTER_S} s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, PromptTooLong):
        return ApiError(400, exc.message, code="context_length_exceeded", param=input_field)
    if isinstance(exc, InvalidParameters):
        return ApiError(400, exc.message, code="invalid_parameters")
    if isinstance(exc, TemplateError):
        return ApiError(400, f"chat template: {exc.message}", code=exc.code, param=input_field)
    if isinstance(exc, InvalidRequest):
        return ApiError(400, exc.message, code=exc.code)
    if isinstance(exc, ShuttingDown):
        return _unavailable(f"the worker is shutting down: {exc.message}")
    if isinstance(exc, (WorkerUnavailable, ClientClosed)):
        return _unavailable(str(exc))
    if isinstance(exc, RequestError):
        return ApiError(500, exc.message, type="server_error", code=exc.code)
    return ApiError(
        502, f"bad reply from the worker: {exc}", type="server_error", code="bad_gateway"
    )


def _unavailable(message: str) -> ApiError:
    return ApiError(
        503,
        message,
        type="server_error",
        code="worker_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
