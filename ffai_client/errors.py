"""The exception tree of `ffai_client`, in one place.

::

    FFAIError                      anything this library raises on purpose
    ├── ClientClosed               the client was closed (also: used again after closing)
    ├── WorkerUnavailable          no worker there, it died, or no connection within the timeout
    │   ├── RequestTimeout         the worker is alive but one request got no frame in time
    │   ├── AuthenticationFailed   the worker refused the handshake (CurveZMQ keys or their absence)
    │   └── UnsafeEndpoint         the ipc socket's directory or file may belong to someone else
    ├── ProtocolError              the worker sent something this client cannot parse
    └── RequestError               the worker refused or failed one request (.code, .request_id)
        ├── InvalidRequest         bad_frame, unsupported_version, unknown_type,
        │                          invalid_request, duplicate_id
        ├── InvalidParameters      invalid_parameters
        ├── PromptTooLong          prompt_too_long
        ├── Busy                   busy
        ├── TemplateError          no_chat_template, template_error
        ├── ShuttingDown           shutting_down
        └── InternalError          internal (and any code this version does not know)

Error codes are stable strings from `protocol/SPEC.md`; `error_for_code` maps
a wire error frame to the right subclass.
"""

from __future__ import annotations

ERROR_CODES: tuple[str, ...] = (
    "bad_frame",
    "unsupported_version",
    "unknown_type",
    "invalid_request",
    "invalid_parameters",
    "prompt_too_long",
    "duplicate_id",
    "busy",
    "no_chat_template",
    "template_error",
    "shutting_down",
    "internal",
)


class FFAIError(Exception):
    """Base class of every error this library raises on purpose."""


class ClientClosed(FFAIError):
    """This client was closed: its pending requests end with this, and so does any new call.

    Not a `WorkerUnavailable`: the worker may be fine; this side hung up.
    """


class WorkerUnavailable(FFAIError):
    """The worker did not answer in time, went away, or was never there."""


class RequestTimeout(WorkerUnavailable):
    """A live worker sent nothing for one request within its `request_timeout`."""


class AuthenticationFailed(WorkerUnavailable):
    """The worker closed the connection during the handshake: the CurveZMQ keys disagree."""


class UnsafeEndpoint(WorkerUnavailable):
    """The ipc socket's directory or file is not safely this user's: connecting could leak."""


class ProtocolError(FFAIError):
    """A frame from the worker broke the protocol (undecodable or ill-typed)."""


class RequestError(FFAIError):
    """The worker answered a request with an error frame."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class InvalidRequest(RequestError):
    """The frame or request was malformed (see `code` for which way)."""


class InvalidParameters(RequestError):
    """A generation parameter was out of range or of the wrong type."""


class PromptTooLong(RequestError):
    """The prompt does not fit the model's context (or the worker's limit)."""


class Busy(RequestError):
    """The worker's waiting queue is full; try again later."""


class TemplateError(RequestError):
    """The chat template is missing, raised an error, or broke the sandbox."""


class ShuttingDown(RequestError):
    """The worker is stopping and ended this request."""


class InternalError(RequestError):
    """The worker failed unexpectedly on this request; others are unaffected."""


_CODE_TO_CLASS: dict[str, type[RequestError]] = {
    "bad_frame": InvalidRequest,
    "unsupported_version": InvalidRequest,
    "unknown_type": InvalidRequest,
    "invalid_request": InvalidRequest,
    "duplicate_id": InvalidRequest,
    "invalid_parameters": InvalidParameters,
    "prompt_too_long": PromptTooLong,
    "busy": Busy,
    "no_chat_template": TemplateError,
    "template_error": TemplateError,
    "shutting_down": ShuttingDown,
    "internal": InternalError,
}


def error_for_code(code: str, message: str, request_id: str | None = None) -> RequestError:
    """The exception for a wire error frame; unknown codes become `InternalError`."""
    cls = _CODE_TO_CLASS.get(code, InternalError)
    return cls(code, message, request_id)


__all__ = [
    "ERROR_CODES",
    "AuthenticationFailed",
    "Busy",
    "FFAIError",
    "InternalError",
    "InvalidParameters",
    "InvalidRequest",
    "PromptTooLong",
    "ProtocolError",
    "RequestError",
    "RequestTimeout",
    "ShuttingDown",
    "TemplateError",
    "UnsafeEndpoint",
    "WorkerUnavailable",
    "error_for_code",
]
