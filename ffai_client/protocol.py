"""The FFAI wire protocol, version 1: the msgpack codec of the messages in `messages.py`.

`protocol/SPEC.md` is the contract and this module is its reference
implementation. `encode` writes the canonical bytes (`v`, `type`, then the
fields, optionals left out when they hold their default, floats as float64);
`decode_client` / `decode_worker` check every field, raising `FrameError`
with the spec's error code and nothing else, whatever the input bytes. Both
walk the dataclass declarations (`_wire.py`): what a field is, and whether it
is optional, is written once, in `messages.py` and `types.py`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any, NoReturn

import msgpack  # type: ignore[import-untyped]

from ffai_client._wire import MIN, POSITIVE, FieldSpec, coerce, specs, to_wire_map
from ffai_client.errors import ProtocolError
from ffai_client.messages import (
    CLIENT_MESSAGES,
    MAX_ID_BYTES,
    WORKER_MESSAGES,
    Cancel,
    Chunk,
    ClientMessage,
    DetokenizeReply,
    DetokenizeRequest,
    Error,
    Generate,
    Hello,
    InfoReply,
    InfoRequest,
    Limits,
    Message,
    Ping,
    Pong,
    RenderReply,
    RenderRequest,
    TokenizeReply,
    TokenizeRequest,
    Welcome,
    WorkerMessage,
    is_request_id,
)
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationChunk,
    GenerationParameters,
    GenerationStats,
    TokenLogprob,
)

__all__ = [
    "CLIENT_MESSAGE_TYPES",
    "MAX_COUNT",
    "MAX_DEPTH",
    "MAX_ID_BYTES",
    "MAX_TOKEN_ID",
    "PROTOCOL_VERSION",
    "WORKER_MESSAGE_TYPES",
    "Cancel",
    "Chunk",
    "ClientMessage",
    "DetokenizeReply",
    "DetokenizeRequest",
    "Error",
    "FrameError",
    "Generate",
    "Hello",
    "InfoReply",
    "InfoRequest",
    "Limits",
    "Message",
    "Ping",
    "Pong",
    "RenderReply",
    "RenderRequest",
    "TokenizeReply",
    "TokenizeRequest",
    "Welcome",
    "WorkerMessage",
    "decode_client",
    "decode_worker",
    "encode",
    "encode_chunk",
    "to_wire",
]

PROTOCOL_VERSION = 1
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


# -- encoding ----------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """The canonical msgpack bytes of one message (see SPEC.md, "Canonical encoding")."""
    return _packb(to_wire(message))


def to_wire(message: Message) -> dict[str, Any]:
    """The map `encode` packs: `v`, `type`, then the fields in order, defaults left out."""
    return {"v": PROTOCOL_VERSION, "type": message.TYPE, **to_wire_map(message)}


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
        out["stats"] = chunk.stats.to_dict()
    if chunk.logprobs is not None:
        out["logprobs"] = [lp.to_dict() for lp in chunk.logprobs]
    if chunk.prompt_logprobs is not None:
        out["prompt_logprobs"] = [float(x) for x in chunk.prompt_logprobs]
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


# -- decoding ----------------------------------------------------------------------------------


def decode_client(data: bytes, *, max_message_bytes: int | None = None) -> ClientMessage:
    """Decode and check a client → worker frame; raises FrameError only."""
    return _decode(data, max_message_bytes, _CLIENT_TYPES)  # type: ignore[no-any-return]


def decode_worker(data: bytes, *, max_message_bytes: int | None = None) -> WorkerMessage:
    """Decode and check a worker → client frame; raises FrameError only."""
    return _decode(data, max_message_bytes, _WORKER_TYPES)  # type: ignore[no-any-return]


def _decode(data: bytes, limit: int | None, decoders: Mapping[str, type]) -> Any:
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


def _decode_map(obj: dict[Any, Any], rid: str | None, decoders: Mapping[str, type]) -> Any:
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
    cls = decoders.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FrameError("unknown_type", f"unknown message type {_brief(kind)}", rid)
    return _read_message(cls, _Fields(obj, str(kind), rid))


def _readable_id(value: Any) -> str | None:
    return value if is_request_id(value) else None


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


class _Fields:
    """Typed reads from one decoded map; any failure raises FrameError (nil reads as absent)."""

    def __init__(self, data: Mapping[Any, Any], where: str, request_id: str | None) -> None:
        self.data = data
        self.where = where
        self.request_id = request_id

    def fail(self, name: str, problem: str, code: str = "invalid_request") -> NoReturn:
        raise FrameError(code, f"{self.where}.{name} {problem}", self.request_id)

    def read(self, spec: FieldSpec, tag: str, *, record: bool = False) -> Any:
        """One field's value; in a record (section 6 `always` tables) only nullables may lack."""
        name = spec.name
        raw = self.data.get(name)
        if raw is None:
            if spec.required or (record and not spec.optional):
                self.fail(name, "is required")
            return spec.fresh_default()
        if tag == "str":  # the common case first: ids and text
            if not isinstance(raw, str):
                self.fail(name, f"must be a str, got {_kind(raw)}")
            return raw
        if tag == "tokens":
            if not isinstance(raw, list) or not all(type(t) is int for t in raw):
                self.fail(name, "must be an array of ints")
            if raw and not (0 <= min(raw) and max(raw) <= MAX_TOKEN_ID):
                self.fail(name, f"must hold token ids in [0, {MAX_TOKEN_ID}]")
            return raw
        if tag == "params":
            return self.structure(name, raw, GenerationParameters.from_dict, "invalid_parameters")
        if tag == "options":
            return self.structure(name, raw, ChatTemplateOptions.from_dict)
        if tag == "messages":
            if not isinstance(raw, list):
                self.fail(name, f"must be an array of maps, got {_kind(raw)}")
            build = ChatMessage.from_dict
            return [self.structure(f"{name}[{i}]", m, build) for i, m in enumerate(raw)]
        if tag == "logprobs":
            if not isinstance(raw, list):
                self.fail(name, f"must be an array of maps, got {_kind(raw)}")
            read = TokenLogprob.from_dict
            return [self.structure(f"{name}[{i}]", m, read) for i, m in enumerate(raw)]
        if tag == "record":
            if not isinstance(raw, dict):
                self.fail(name, f"must be a map, got {_kind(raw)}")
            return _read_record(spec.inner, _Fields(raw, f"{self.where}.{name}", self.request_id))
        try:
            value = coerce(spec.inner, raw)
        except ValueError as exc:
            self.fail(name, str(exc))
        self.check(spec, value)
        return value

    def check(self, spec: FieldSpec, value: Any) -> None:
        """The wire's own ranges: counts, finite floats, plain `any` values."""
        kind, name = spec.inner, spec.name
        if kind is int:
            low = spec.field.metadata.get(MIN, 0)
            if not low <= value <= MAX_COUNT:
                self.fail(name, f"must be in [{low}, {MAX_COUNT}], got {value}")
        elif kind is float:
            if not math.isfinite(value):
                self.fail(name, f"must be a finite number, got {value}")
            if spec.field.metadata.get(POSITIVE) and value <= 0:
                self.fail(name, f"must be > 0, got {value}")
        elif kind == dict[str, Any]:
            self.plain(name, value)

    def structure(self, name: str, raw: Any, build: Any, code: str = "invalid_request") -> Any:
        """A section 6 structure, built (and checked) by its own type."""
        if code == "invalid_request":
            self.plain(name, raw)
        elif not isinstance(raw, dict):
            self.fail(name, f"must be a map, got {_kind(raw)}", code)
        try:
            return build(raw)
        except (ValueError, TypeError, OverflowError) as exc:
            self.fail(name, f"is invalid: {exc}", code)

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


def _read_message(cls: type, r: _Fields) -> Any:
    """Read every field, then let the message check itself (its `__post_init__`).

    Problems in `params` are reported last: invalid_request outranks invalid_parameters.
    """
    values: dict[str, Any] = {}
    bad_params: FrameError | None = None
    for spec, tag in _plan(cls):
        try:
            values[spec.name] = r.read(spec, tag)
        except FrameError as exc:
            if exc.code != "invalid_parameters":
                raise
            bad_params = bad_params or exc
    message = _construct(cls, values, r)
    if bad_params is not None:
        raise bad_params
    return message


def _read_record(cls: type, r: _Fields) -> Any:
    values = {spec.name: r.read(spec, tag, record=True) for spec, tag in _plan(cls)}
    return _construct(cls, values, r)


_PLANS: dict[type, tuple[tuple[FieldSpec, str], ...]] = {}


def _plan(cls: type) -> tuple[tuple[FieldSpec, str], ...]:
    """Each field with how to read it, worked out once per class (decoding is per chunk)."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = tuple((spec, _tag(spec.inner)) for spec in specs(cls))
    return plan


def _tag(kind: Any) -> str:
    tags: list[tuple[Any, str]] = [
        (str, "str"),
        (list[int], "tokens"),
        (GenerationParameters, "params"),
        (ChatTemplateOptions, "options"),
        (list[ChatMessage], "messages"),
        (Limits, "record"),
        (GenerationStats, "record"),
        (list[TokenLogprob], "logprobs"),
    ]
    return next((tag for k, tag in tags if kind == k), "value")


def _construct(cls: type, values: dict[str, Any], r: _Fields) -> Any:
    try:
        return cls(**values)
    except ValueError as exc:
        raise FrameError("invalid_request", f"{r.where}: {exc}", r.request_id) from None


_CLIENT_TYPES: dict[str, type] = {cls.TYPE: cls for cls in CLIENT_MESSAGES}
_WORKER_TYPES: dict[str, type] = {cls.TYPE: cls for cls in WORKER_MESSAGES}

# The closed message sets, in SPEC.md's order.
CLIENT_MESSAGE_TYPES: tuple[str, ...] = tuple(_CLIENT_TYPES)
WORKER_MESSAGE_TYPES: tuple[str, ...] = tuple(_WORKER_TYPES)
