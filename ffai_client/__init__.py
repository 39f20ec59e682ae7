"""FFAI client: stream tokens from an FFAI worker over ZeroMQ (no MLX needed).

async with AsyncClient() as client:
    async for chunk in client.generate_stream("Once upon a time"):
        print(chunk.text, end="")
"""

from ffai_client.client import AsyncClient
from ffai_client.curve import CurveClientKeys
from ffai_client.endpoints import default_endpoint, resolve_endpoint
from ffai_client.errors import (
    AuthenticationFailed,
    Busy,
    ClientClosed,
    FFAIError,
    InternalError,
    InvalidParameters,
    InvalidRequest,
    PromptTooLong,
    ProtocolError,
    RequestError,
    RequestTimeout,
    ShuttingDown,
    TemplateError,
    UnsafeEndpoint,
    WorkerUnavailable,
)
from ffai_client.messages import InfoReply, Limits, Pong, RenderReply, Welcome
from ffai_client.stream import GenerationStream
from ffai_client.sync import Client, SyncGenerationStream
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationChunk,
    GenerationParameters,
    GenerationResult,
    GenerationStats,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "Busy",
    "ChatMessage",
    "ChatTemplateOptions",
    "Client",
    "ClientClosed",
    "CurveClientKeys",
    "FFAIError",
    "GenerationChunk",
    "GenerationParameters",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "InfoReply",
    "InternalError",
    "InvalidParameters",
    "InvalidRequest",
    "Limits",
    "Pong",
    "PromptTooLong",
    "ProtocolError",
    "RenderReply",
    "RequestError",
    "RequestTimeout",
    "ShuttingDown",
    "SyncGenerationStream",
    "TemplateError",
    "UnsafeEndpoint",
    "Welcome",
    "WorkerUnavailable",
    "__version__",
    "default_endpoint",
    "resolve_endpoint",
]
