"""The FFAI wire protocol, version 1: typed messages and their msgpack codec.

`protocol/SPEC.md` is the contract and this module is its reference
implementation. Each message is a frozen dataclass whose fields are in the
spec's order; `encode` writes the canonical bytes (`v`, `type`, then the
fields, optionals left out when they hold their default, floats as float64)
and `decode_client` / `decode_worker` check every field, raising `FrameError`
with the spec's error code and nothing else, whatever the input bytes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, NoReturn, Union

import msgpack  # type: ignore[import-untyped]

from ffai_client.errors import ProtocolError
from ffai_client.types import (
    FINISH_REASONS,
    ChatMessage,
    ChatTemplateOptions,
    FinishReason,
    GenerationChunk,
    GenerationParameters,
    GenerationStats,
)

PROTOCOL_VERSION = 1
MAX_ID_BYTES = 256  # request ids: 1..256 bytes of UTF-8
MAX_DEPTH = 64  # nested maps/arrays; the top-level map is level 1
MAX_TOKEN_ID = 2**31 - 1
MAX_COUNT = 2**63 - 1  # every count fits a signed 64-bit integer


class FrameError(ProtocolError):
    """A frame that breaks the protocol; `code` is the spec's error code.

    `request_id` is the frame's `id` when it could be read, so the worker can
    address its error reply to the right request.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The worker's limits, advertised in `welcome` and `info`."""

    max_message_bytes: int
    max_prompt_tokens: int
    max_tokens: int
    max_batch: int
    max_queue: int
    context_length: int


@dataclass(frozen=True, kw_only=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    client: str | None = None


@dataclass(frozen=True, kw_only=True)
class Generate:
    TYPE: ClassVar[str] = "generate"
    id: str
    prompt: str | None = None
    tokens: list[int] | None = None
    messages: list[ChatMessage] | None = None
    params: GenerationParameters = field(default_factory=GenerationParameters)
    options: ChatTemplateOptions | None = None
    add_special_tokens: bool = True


@dataclass(frozen=True, kw_only=True)
class Cancel:
    TYPE: ClassVar[str] = "cancel"
    id: str


@dataclass(frozen=True, kw_only=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: str | None = None


@dataclass(frozen=True, kw_only=True)
class InfoRequest:
    TYPE: ClassVar[str] = "info"
    id: str


@dataclass(frozen=True, kw_only=True)
class TokenizeRequest:
    TYPE: ClassVar[str] = "tokenize"
    id: str
    text: str
    add_special_tokens: bool = True


@dataclass(frozen=True, kw_only=True)
class DetokenizeRequest:
    TYPE: ClassVar[str] = "detokenize"
    id: str
    tokens: list[int]
    skip_special_tokens: bool = True


@dataclass(frozen=True, kw_only=True)
class RenderRequest:
    TYPE: ClassVar[str] = "render"
    id: str
    messages: list[ChatMessage]
    options: ChatTemplateOptions | None = None


@dataclass(frozen=True, kw_only=True)
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    protocol: int
    server: str
    model: str
    heartbeat_interval_s: float
    limits: Limits


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One streamed piece; the final chunk has empty text/tokens, `finish_reason` and `stats`."""

    TYPE: ClassVar[str] = "chunk"
    id: str
    text: str
    tokens: list[int]
    position: int
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None

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
        )


@dataclass(frozen=True, kw_only=True)
class Error:
    TYPE: ClassVar[str] = "error"
    id: str | None = None
    code: str
    message: str


@dataclass(frozen=True, kw_only=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    id: str | None = None
    running: int
    waiting: int


@dataclass(frozen=True, kw_only=True)
class InfoReply:
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


@dataclass(frozen=True, kw_only=True)
class TokenizeReply:
    TYPE: ClassVar[str] = "tokenize"
    id: str
    tokens: list[int]


@dataclass(frozen=True, kw_only=True)
class DetokenizeReply:
    TYPE: ClassVar[str] = "detokenize"
    id: str
    text: str


@dataclass(frozen=True, kw_only=True)
class RenderReply:
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


# -- encoding ----------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """The canonical msgpack bytes of one message (see SPEC.md, "Canonical encoding")."""
    return _packb(to_wire(message))


def encode_chunk(request_id: str, chunk: GenerationChunk) -> bytes:
    """`encode(Chunk.from_generation_chunk(request_id, chunk))`, byte for byte, but faster.

    The worker sends one chunk per token, so this skips the generic dataclass walk.
    """
    out: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": "chunk",
        "id": request_id,
        "text": chunk.text,
        "tokens": list(chunk.tokens),
        "position": chunk.position,
    }
    if chunk.finish_reason is not None:
        out["finish_reason"] = chunk.finish_reason
    if chunk.stats is not None:
        out["stats"] = stats_to_wire(chunk.stats)
    return _packb(out)


_packers = threading.local()


def _packb(obj: Any) -> bytes:
    """`msgpack.packb(obj, use_bin_type=True)` through a per-thread reused Packer.

    Every new Packer allocates (and then frees) a 1 MiB buffer; in a process
    whose other threads are busy (MLX), that malloc/free pair is an
    mmap/munmap with a TLB shootdown and costs tens of microseconds per frame.
    """
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    data: bytes = packer.pack(obj)
    return data


def to_wire(message: Message) -> dict[str, Any]:
    """The map `encode` packs: `v`, `type`, then the fields in order, defaults left out."""
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": message.TYPE}
    for f in fields(message):
        value = getattr(message, f.name)
        if f.default is not MISSING and value == f.default:
            continue
        if f.default_factory is not MISSING and value == f.default_factory():
            continue
        out[f.name] = _wire_value(f.name, value)
    return out


def _wire_value(name: str, value: Any) -> Any:
    if isinstance(value, GenerationParameters):
        return params_to_wire(value)
    if isinstance(value, ChatTemplateOptions):
        return value.to_dict()
    if isinstance(value, GenerationStats):
        return stats_to_wire(value)
    if isinstance(value, Limits):
        return {f.name: int(getattr(value, f.name)) for f in fields(value)}
    if name == "messages":
        return [m.to_dict() if isinstance(m, ChatMessage) else dict(m) for m in value]
    if name in _FLOAT_FIELDS:
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    return value


_FLOAT_FIELDS = frozenset({"heartbeat_interval_s", "service_cpu_s"})


def params_to_wire(params: GenerationParameters) -> dict[str, Any]:
    """Parameters that differ from the defaults; floats as floats, logit_bias sorted by id."""
    out = params.to_dict()
    for name in _PARAM_FLOATS:
        if out.get(name) is not None:
            out[name] = float(out[name])
    if "logit_bias" in out:
        bias = params.logit_bias
        out["logit_bias"] = {str(t): float(bias[t]) for t in sorted(bias)}
    return out


def stats_to_wire(stats: GenerationStats) -> dict[str, Any]:
    """Every stats field in declaration order; float fields as floats."""
    out: dict[str, Any] = {}
    for f in fields(stats):
        value = getattr(stats, f.name)
        if value is not None and f.name in _STATS_FLOATS:
            value = float(value)
        out[f.name] = value
    return out


_PARAM_FLOATS = frozenset(
    f.name
    for f in fields(GenerationParameters)
    if isinstance(f.default, float) or f.name == "temperature"
)
_STATS_FLOATS = frozenset(
    f.name
    for f in fields(GenerationStats)
    if isinstance(f.default, float) or f.name == "steady_tokens_per_second"
)


# -- decoding ----------------------------------------------------------------------------------


def decode_client(data: bytes, *, max_message_bytes: int | None = None) -> ClientMessage:
    """Decode and check a client → worker frame; raises FrameError only."""
    return _decode(data, max_message_bytes, _CLIENT_DECODERS)  # type: ignore[no-any-return]


def decode_worker(data: bytes, *, max_message_bytes: int | None = None) -> WorkerMessage:
    """Decode and check a worker → client frame; raises FrameError only."""
    return _decode(data, max_message_bytes, _WORKER_DECODERS)  # type: ignore[no-any-return]


def _decode(
    data: bytes, limit: int | None, decoders: Mapping[str, Callable[[_Fields], Any]]
) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("bad_frame", "a frame must be bytes")
    if limit is not None and len(data) > limit:
        raise FrameError("bad_frame", f"the frame has {len(data)} bytes; the limit is {limit}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # every msgpack failure (truncated, invalid UTF-8, …)
        detail = str(exc)[:200] or type(exc).__name__
        raise FrameError("bad_frame", f"not one valid msgpack object: {detail}") from None
    if not isinstance(obj, dict):
        raise FrameError("bad_frame", f"a frame must be a msgpack map, got {_kind(obj)}")
    rid = _readable_id(obj.get("id"))
    try:
        return _decode_map(obj, rid, decoders)
    except FrameError:
        raise
    except Exception as exc:  # a codec bug must still come out as a FrameError
        raise FrameError("internal", f"decoder failed: {type(exc).__name__}", rid) from exc


def _decode_map(
    obj: dict[Any, Any], rid: str | None, decoders: Mapping[str, Callable[[_Fields], Any]]
) -> Any:
    if _too_deep(obj):
        raise FrameError("bad_frame", f"the frame nests deeper than {MAX_DEPTH} levels", rid)
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise FrameError(
            "unsupported_version",
            f"protocol version {_brief(version)} is not supported (this end speaks"
            f" {PROTOCOL_VERSION})",
            rid,
        )
    kind = obj.get("type")
    decoder = decoders.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise FrameError("unknown_type", f"unknown message type {_brief(kind)}", rid)
    return decoder(_Fields(obj, str(kind), rid))


def _readable_id(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES:
        return value
    return None


def _too_deep(obj: Any) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


def _kind(value: Any) -> str:
    """The msgpack family of a decoded value, for messages."""
    for kind, types in _KINDS:
        if isinstance(value, types):
            return kind
    return "nil" if value is None else "ext"


_KINDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("bool", bool),
    ("int", int),
    ("float", float),
    ("str", str),
    ("bin", bytes),
    ("array", list),
    ("map", dict),
)


def _brief(value: Any) -> str:
    if isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"({_kind(value)})"


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


class _Fields:
    """Typed reads from one decoded map; any failure raises FrameError (nil reads as absent)."""

    def __init__(self, data: Mapping[Any, Any], where: str, request_id: str | None) -> None:
        self.data = data
        self.where = where
        self.request_id = request_id

    def fail(self, name: str, problem: str, code: str = "invalid_request") -> NoReturn:
        raise FrameError(code, f"{self.where}.{name} {problem}", self.request_id)

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def required(self, name: str) -> Any:
        value = self.data.get(name)
        if value is None:
            self.fail(name, "is required")
        return value

    def text(self, name: str) -> str:
        value = self.required(name)
        if not isinstance(value, str):
            self.fail(name, f"must be a str, got {_kind(value)}")
        return value

    def opt_text(self, name: str) -> str | None:
        return None if self.get(name) is None else self.text(name)

    def request_id_field(self) -> str:
        value = self.text("id")
        if _readable_id(value) is None:
            self.fail("id", f"must be 1 to {MAX_ID_BYTES} bytes of UTF-8")
        return value

    def opt_request_id(self) -> str | None:
        return None if self.get("id") is None else self.request_id_field()

    def integer(self, name: str, low: int = 0, high: int = MAX_COUNT) -> int:
        value = self.required(name)
        if not _is_int(value):
            self.fail(name, f"must be an int, got {_kind(value)}")
        if not low <= value <= high:
            self.fail(name, f"must be in [{low}, {high}], got {value}")
        return int(value)

    def number(self, name: str, *, positive: bool = False) -> float:
        value = self.required(name)
        if not _is_number(value) or not math.isfinite(value):
            self.fail(name, f"must be a finite number, got {_brief(value)}")
        if positive and value <= 0:
            self.fail(name, f"must be > 0, got {value}")
        return float(value)

    def flag(self, name: str, default: bool | None = None) -> bool:
        value = self.get(name) if default is not None else self.required(name)
        if value is None and default is not None:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"must be a bool, got {_kind(value)}")
        return value

    def tokens(self, name: str) -> list[int]:
        value = self.required(name)
        if not isinstance(value, list) or not all(type(t) is int for t in value):
            self.fail(name, "must be an array of ints")
        if value and not (0 <= min(value) and max(value) <= MAX_TOKEN_ID):
            self.fail(name, f"must hold token ids in [0, {MAX_TOKEN_ID}]")
        return list(value)

    def opt_tokens(self, name: str) -> list[int] | None:
        return None if self.get(name) is None else self.tokens(name)

    def submap(self, name: str) -> _Fields:
        value = self.required(name)
        if not isinstance(value, dict):
            self.fail(name, f"must be a map, got {_kind(value)}")
        return _Fields(value, f"{self.where}.{name}", self.request_id)

    def messages(self, name: str) -> list[ChatMessage]:
        value = self.required(name)
        if not isinstance(value, list):
            self.fail(name, f"must be an array of maps, got {_kind(value)}")
        out = []
        for i, item in enumerate(value):
            self.plain(f"{name}[{i}]", item)
            try:
                out.append(ChatMessage.from_dict(item))
            except (ValueError, TypeError) as exc:
                self.fail(f"{name}[{i}]", f"is not a chat message: {exc}")
        return out

    def opt_messages(self, name: str) -> list[ChatMessage] | None:
        return None if self.get(name) is None else self.messages(name)

    def options(self, name: str) -> ChatTemplateOptions | None:
        value = self.get(name)
        if value is None:
            return None
        self.plain(name, value)
        try:
            return ChatTemplateOptions.from_dict(value)
        except (ValueError, TypeError) as exc:
            self.fail(name, f"is invalid: {exc}")

    def params(self, name: str) -> GenerationParameters:
        value = self.get(name)
        if value is None:
            return GenerationParameters()
        code = "invalid_parameters"
        if not isinstance(value, dict):
            self.fail(name, f"must be a map, got {_kind(value)}", code)
        bias = value.get("logit_bias")
        if isinstance(bias, dict):
            for key in bias:
                if not _token_key(key):
                    self.fail(f"{name}.logit_bias", f"has a bad key {_brief(key)}", code)
        try:
            return GenerationParameters.from_dict(value)
        except (ValueError, TypeError, OverflowError) as exc:
            self.fail(name, f"are invalid: {exc}", code)

    def plain(self, name: str, value: Any) -> None:
        """Free-form values hold only nil, bool, int, float, str, arrays and str-keyed maps."""
        if value is None or isinstance(value, (bool, int, float, str)):
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.plain(f"{name}[{i}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.fail(name, f"has a non-str map key ({_kind(key)})")
                self.plain(f"{name}.{key}", item)
        else:
            self.fail(name, f"must not hold {_kind(value)} values")


def _token_key(key: Any) -> bool:
    """A logit_bias key: a canonical decimal string (or, leniently, an int)."""
    if _is_int(key):
        return True
    return (
        isinstance(key, str)
        and 0 < len(key) <= 10
        and key.isascii()
        and key.isdigit()
        and (key == "0" or key[0] != "0")
    )


# -- per-message decoders ----------------------------------------------------------------------


def _generate(r: _Fields) -> Generate:
    rid = r.request_id_field()
    given = [name for name in ("prompt", "tokens", "messages") if r.get(name) is not None]
    if len(given) != 1:
        r.fail("prompt", f"/tokens/messages: give exactly one, got {given or 'none'}")
    return Generate(
        id=rid,
        prompt=r.opt_text("prompt"),
        tokens=r.opt_tokens("tokens"),
        messages=r.opt_messages("messages"),
        options=r.options("options"),
        add_special_tokens=r.flag("add_special_tokens", True),
        params=r.params("params"),  # last: invalid_request outranks invalid_parameters
    )


def _limits(r: _Fields) -> Limits:
    return Limits(**{f.name: r.integer(f.name) for f in fields(Limits)})


def _stats(r: _Fields) -> GenerationStats:
    values: dict[str, Any] = {}
    for f in fields(GenerationStats):
        if f.name not in _STATS_FLOATS:
            values[f.name] = r.integer(f.name)
        elif f.default is None and r.get(f.name) is None:
            values[f.name] = None
        else:
            values[f.name] = r.number(f.name)
    return GenerationStats(**values)


def _chunk(r: _Fields) -> Chunk:
    rid = r.request_id_field()
    reason = r.get("finish_reason")
    if reason is not None and reason not in FINISH_REASONS:
        r.fail("finish_reason", f"must be one of {', '.join(FINISH_REASONS)}")
    stats = _stats(r.submap("stats")) if r.get("stats") is not None else None
    chunk = Chunk(
        id=rid,
        text=r.text("text"),
        tokens=r.tokens("tokens"),
        position=r.integer("position"),
        finish_reason=reason,
        stats=stats,
    )
    if (reason is None) != (stats is None):
        r.fail("stats", "and finish_reason must come together (final chunk only)")
    if stats is not None and (chunk.text or chunk.tokens):
        r.fail("text", "and tokens must be empty in the final chunk")
    return chunk


def _quantization(r: _Fields) -> dict[str, Any] | None:
    if r.get("quantization") is None:
        return None
    q = r.submap("quantization")
    q.integer("group_size", 1)
    q.integer("bits", 1, 64)
    r.plain("quantization", r.get("quantization"))
    return dict(q.data)


def _info_reply(r: _Fields) -> InfoReply:
    return InfoReply(
        id=r.request_id_field(),
        model=r.text("model"),
        architecture=r.text("architecture"),
        context_length=r.integer("context_length"),
        dtype=r.text("dtype"),
        quantization=_quantization(r),
        has_chat_template=r.flag("has_chat_template"),
        limits=_limits(r.submap("limits")),
        running=r.integer("running"),
        waiting=r.integer("waiting"),
        kv_cache_bytes=r.integer("kv_cache_bytes"),
        blas=r.text("blas"),
        frames_sent=None if r.get("frames_sent") is None else r.integer("frames_sent"),
        service_cpu_s=None if r.get("service_cpu_s") is None else r.number("service_cpu_s"),
    )


_CLIENT_DECODERS: dict[str, Callable[[_Fields], ClientMessage]] = {
    "hello": lambda r: Hello(client=r.opt_text("client")),
    "generate": _generate,
    "cancel": lambda r: Cancel(id=r.request_id_field()),
    "ping": lambda r: Ping(id=r.opt_request_id()),
    "info": lambda r: InfoRequest(id=r.request_id_field()),
    "tokenize": lambda r: TokenizeRequest(
        id=r.request_id_field(),
        text=r.text("text"),
        add_special_tokens=r.flag("add_special_tokens", True),
    ),
    "detokenize": lambda r: DetokenizeRequest(
        id=r.request_id_field(),
        tokens=r.tokens("tokens"),
        skip_special_tokens=r.flag("skip_special_tokens", True),
    ),
    "render": lambda r: RenderRequest(
        id=r.request_id_field(), messages=r.messages("messages"), options=r.options("options")
    ),
}

_WORKER_DECODERS: dict[str, Callable[[_Fields], WorkerMessage]] = {
    "welcome": lambda r: Welcome(
        protocol=r.integer("protocol", 1),
        server=r.text("server"),
        model=r.text("model"),
        heartbeat_interval_s=r.number("heartbeat_interval_s", positive=True),
        limits=_limits(r.submap("limits")),
    ),
    "chunk": _chunk,
    "error": lambda r: Error(id=r.opt_request_id(), code=r.text("code"), message=r.text("message")),
    "pong": lambda r: Pong(
        id=r.opt_request_id(), running=r.integer("running"), waiting=r.integer("waiting")
    ),
    "info": _info_reply,
    "tokenize": lambda r: TokenizeReply(id=r.request_id_field(), tokens=r.tokens("tokens")),
    "detokenize": lambda r: DetokenizeReply(id=r.request_id_field(), text=r.text("text")),
    "render": lambda r: RenderReply(
        id=r.request_id_field(), text=r.text("text"), tokens=r.tokens("tokens")
    ),
}

# The closed message sets, in SPEC.md's order.
CLIENT_MESSAGE_TYPES: tuple[str, ...] = tuple(_CLIENT_DECODERS)
WORKER_MESSAGE_TYPES: tuple[str, ...] = tuple(_WORKER_DECODERS)
