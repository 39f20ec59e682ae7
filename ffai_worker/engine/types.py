"""What crosses the engine's boundary: request keys in, immutable step outputs and load out.

The server (and any other driver) sees only these: never a `Sequence`, never the
scheduler's queues, so the engine's internals can change without the server.
No MLX here, so the types load anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ffai_client.types import GenerationChunk

LOCAL_CLIENT = b""  # the client of in-process requests (`Engine.generate_stream`)


class RequestKey(NamedTuple):
    """A live request: the client's socket identity and the id it chose (unique per client)."""

    client: bytes
    request_id: str


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one engine step produced for one request."""

    key: RequestKey
    chunks: tuple[GenerationChunk, ...]  # in order; a final chunk is always last
    finished: bool  # the last chunk is the final one (stats, finish_reason)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Requests holding a KV slot, and requests queued for one."""

    running: int
    waiting: int
