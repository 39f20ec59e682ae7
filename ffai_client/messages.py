"""The messages of the FFAI wire protocol, version 1, as frozen dataclasses.

Fields are in `protocol/SPEC.md`'s order, and their annotations, defaults and
metadata are what the codec (`protocol.py`) reads and writes: a field with a
default is optional on the wire. Rules a message holds whatever its origin
(one prompt input, a final chunk's shape, request ids) live in
`__post_init__`, so the client, the worker and the codec share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ffai_client._wire import MIN, POSITIVE, is_int
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    FinishReason,
    GenerationChunk,
    GenerationParameters,
    GenerationStats,
    TokenLogprob,
    check_prompt_input,
)

MAX_ID_BYTES = 256  # request ids: 1..256 bytes of UTF-8


def is_request_id(value: object) -> bool:
    """A request id: 1 to 256 bytes of UTF-8 (SPEC 3.1)."""
    return isinstance(value, str) and 0 < len(value.encode("utf-8", "surrogatepass")) <= (
        MAX_ID_BYTES
    )


class _Message:
    """Checks every message's `id` (when it has one) on construction."""

    TYPE: ClassVar[str]

    def __post_init__(self) -> None:
        rid = getattr(self, "id", None)
        if rid is not None and not is_request_id(rid):
            raise ValueError(f"id must be 1 to {MAX_ID_BYTES} bytes of UTF-8")


@dataclass(frozen=True)
class Limits:
    """The worker's limits, advertised in `welcome` and `info`."""

    max_message_bytes: int
    max_prompt_tokens: int
    max_tokens: int
    max_batch: int
    max_queue: int
    context_length: int


# -- client → worker ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hello(_Message):
    TYPE: ClassVar[str] = "hello"
    client: str | None = None


@dataclass(frozen=True, kw_only=True)
class Generate(_Message):
    TYPE: ClassVar[str] = "generate"
    id: str
    prompt: str | None = None
    tokens: list[int] | None = None
    messages: list[ChatMessage] | None = None
    params: GenerationParameters = field(default_factory=GenerationParameters)
    options: ChatTemplateOptions | None = None
    add_special_tokens: bool = True
    # Prefill only (additive): the final chunk comes with no tokens and the prompt's KV
    # stays in the worker's prefix cache. Send max_tokens 1 with it: an older worker,
    # which ignores the field, then generates one token at most.
    warm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prompt_input(self.prompt, self.tokens, self.messages)


@dataclass(frozen=True, kw_only=True)
class Cancel(_Message):
    TYPE: ClassVar[str] = "cancel"
    id: str


@dataclass(frozen=True, kw_only=True)
class Ping(_Message):
    TYPE: ClassVar[str] = "ping"
    id: str | None = None


@dataclass(frozen=True, kw_only=True)
class InfoRequest(_Message):
    TYPE: ClassVar[str] = "info"
    id: str


@dataclass(frozen=True, kw_only=True)
class TokenizeRequest(_Message):
    TYPE: ClassVar[str] = "tokenize"
    id: str
    text: str
    add_special_tokens: bool = True


@dataclass(frozen=True, kw_only=True)
class DetokenizeRequest(_Message):
    TYPE: ClassVar[str] = "detokenize"
    id: str
    tokens: list[int]
    skip_special_tokens: bool = True


@dataclass(frozen=True, kw_only=True)
class RenderRequest(_Message):
    TYPE: ClassVar[str] = "render"
    id: str
    messages: list[ChatMessage]
    options: ChatTemplateOptions | None = None


# -- worker → client ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Welcome(_Message):
    TYPE: ClassVar[str] = "welcome"
    protocol: int = field(metadata={MIN: 1})
    server: str
    model: str
    heartbeat_interval_s: float = field(metadata={POSITIVE: True})
    limits: Limits


@dataclass(frozen=True, kw_only=True)
class Chunk(_Message):
    """One streamed piece; the final chunk has empty text/tokens, `finish_reason` and `stats`."""

    TYPE: ClassVar[str] = "chunk"
    id: str
    text: str
    tokens: list[int]
    position: int
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    # Additive (SPEC 10): only when the request asked for them (SPEC 6.6).
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logprobs is not None and len(self.logprobs) != len(self.tokens):
            raise ValueError("logprobs must hold one entry per token of tokens")
        if (self.finish_reason is None) != (self.stats is None):
            raise ValueError("stats and finish_reason must come together (final chunk only)")
        if self.stats is not None and (self.text or self.tokens):
            raise ValueError("text and tokens must be empty in the final chunk")

    @property
    def is_final(self) -> bool:
        return self.stats is not None

    def to_generation_chunk(self) -> GenerationChunk:
        return GenerationChunk(
            text=self.text,
            tokens=list(self.tokens),
            position=self.position,
            stats=self.stats,
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )

    @classmethod
    def from_generation_chunk(cls, request_id: str, chunk: GenerationChunk) -> Chunk:
        return cls(
            id=request_id,
            text=chunk.text,
            tokens=list(chunk.tokens),
            position=chunk.position,
            finish_reason=chunk.finish_reason,
            stats=chunk.stats,
            logprobs=chunk.logprobs,
            prompt_logprobs=chunk.prompt_logprobs,
        )


@dataclass(frozen=True, kw_only=True)
class Error(_Message):
    TYPE: ClassVar[str] = "error"
    id: str | None = None
    code: str
    message: str


@dataclass(frozen=True, kw_only=True)
class Pong(_Message):
    TYPE: ClassVar[str] = "pong"
    id: str | None = None
    running: int
    waiting: int


@dataclass(frozen=True, kw_only=True)
class InfoReply(_Message):
    TYPE: ClassVar[str] = "info"
    id: str
    model: str
    architecture: str
    context_length: int
    dtype: str
    quantization: dict[str, Any] | None = None  # {"group_size", "bits", ...} or None
    has_chat_template: bool
    limits: Limits
    running: int
    waiting: int
    kv_cache_bytes: int
    blas: str
    # Service counters (optional, additive): frames sent since start, and CPU
    # seconds the worker's actor thread spent outside engine steps.
    frames_sent: int | None = None
    service_cpu_s: float | None = None
    # Prefix cache (optional, additive): its bound and what it holds, in bytes of KV
    # and token runs, and counters since start.
    prompt_cache_capacity_bytes: int | None = None
    prompt_cache_bytes: int | None = None
    prompt_cache_entries: int | None = None
    prompt_cache_hits: int | None = None
    prompt_cache_hit_tokens: int | None = None
    prompt_cache_misses: int | None = None
    prompt_cache_evictions: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        q = self.quantization
        if q is not None:
            for key, low, high in (("group_size", 1, 2**63 - 1), ("bits", 1, 64)):
                if not (is_int(q.get(key)) and low <= q[key] <= high):
                    raise ValueError(f"quantization.{key} must be an int in [{low}, {high}]")


@dataclass(frozen=True, kw_only=True)
class TokenizeReply(_Message):
    TYPE: ClassVar[str] = "tokenize"
    id: str
    tokens: list[int]


@dataclass(frozen=True, kw_only=True)
class DetokenizeReply(_Message):
    TYPE: ClassVar[str] = "detokenize"
    id: str
    text: str


@dataclass(frozen=True, kw_only=True)
class RenderReply(_Message):
    TYPE: ClassVar[str] = "render"
    id: str
    text: str
    tokens: list[int]


ClientMessage = Union[  # noqa: UP007 - a runtime alias on 3.10
    Hello, Generate, Cancel, Ping, InfoRequest, TokenizeRequest, DetokenizeRequest, RenderRequest
]
WorkerMessage = Union[  # noqa: UP007
    Welcome, Chunk, Error, Pong, InfoReply, TokenizeReply, DetokenizeReply, RenderReply
]
Message = Union[ClientMessage, WorkerMessage]  # noqa: UP007

# The closed message sets, in SPEC.md's order.
CLIENT_MESSAGES: tuple[type[_Message], ...] = (
    Hello, Generate, Cancel, Ping, InfoRequest, TokenizeRequest, DetokenizeRequest, RenderRequest
)  # fmt: skip
WORKER_MESSAGES: tuple[type[_Message], ...] = (
    Welcome, Chunk, Error, Pong, InfoReply, TokenizeReply, DetokenizeReply, RenderReply
)  # fmt: skip
