"""Public value types shared by the client, the worker and the wire codec.

Everything here is plain data: no sockets, no MLX. The worker imports these
types too, so the in-process engine and the served path return the same
objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Union

FinishReason = Literal["stop", "length", "cancelled"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled")

# Content of a chat message: a plain string or a list of typed parts.
ContentPart = dict[str, Any]
MessageContent = Union[str, list[ContentPart]]  # noqa: UP007 - a runtime alias on 3.10


@dataclass(frozen=True)
class GenerationStats:
    """Measurements for one finished request (the `[STATS]` block)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    context_size: int = 0
    queue_time_s: float = 0.0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    time_to_first_token_ms: float = 0.0
    steady_tokens_per_second: float | None = None  # tokens 11 onward; None if fewer
    baseline_memory_bytes: int = 0
    post_prefill_memory_bytes: int = 0
    post_decode_memory_bytes: int = 0
    prefill_peak_memory_bytes: int = 0
    decode_peak_memory_bytes: int = 0
    weights_bytes: int = 0
    kv_cache_allocated_bytes: int = 0
    kv_cache_used_bytes: int = 0
    cached_prompt_tokens: int = 0
    max_batch_size: int = 1

    @property
    def prefill_tokens_per_second(self) -> float:
        return _rate(self.prompt_tokens - self.cached_prompt_tokens, self.prefill_time_s)

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes out of prefill; decode time covers the rest.
        return _rate(max(self.generated_tokens - 1, 0), self.decode_time_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationStats:
        """Build from a wire map; unknown keys are ignored (additive protocol)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def formatted(self) -> str:
        """Render the human-readable `[STATS]` block."""
        steady = (
            f"{self.steady_tokens_per_second:.1f} tok/s"
            if self.steady_tokens_per_second is not None
            else "n/a (fewer than 11 tokens)"
        )
        lines = [
            "[STATS]",
            f"  prompt:        {self.prompt_tokens} tokens"
            + (f" ({self.cached_prompt_tokens} cached)" if self.cached_prompt_tokens else ""),
            f"  generated:     {self.generated_tokens} tokens",
            f"  context:       {self.prompt_tokens + self.generated_tokens} / {self.context_size}",
            f"  queue:         {self.queue_time_s * 1000:.1f} ms",
            f"  ttft:          {self.time_to_first_token_ms:.1f} ms",
            f"  prefill:       {self.prefill_time_s:.3f} s"
            f" ({self.prefill_tokens_per_second:.1f} tok/s)",
            f"  decode:        {self.decode_time_s:.3f} s"
            f" ({self.decode_tokens_per_second:.1f} tok/s)",
            f"  decode steady: {steady}",
            f"  batch size:    up to {self.max_batch_size}",
            f"  memory base:   {_mib(self.baseline_memory_bytes)}",
            f"  after prefill: {_mib(self.post_prefill_memory_bytes)}"
            f" ({_growth(self.post_prefill_memory_bytes, self.baseline_memory_bytes)})",
            f"  after decode:  {_mib(self.post_decode_memory_bytes)}"
            f" ({_growth(self.post_decode_memory_bytes, self.baseline_memory_bytes)})",
            f"  peak prefill:  {_mib(self.prefill_peak_memory_bytes)}",
            f"  peak decode:   {_mib(self.decode_peak_memory_bytes)}",
            f"  weights:       {_mib(self.weights_bytes)}",
            f"  kv cache:      {_mib(self.kv_cache_allocated_bytes)} allocated,"
            f" {_mib(self.kv_cache_used_bytes)} used",
        ]
        return "\n".join(lines)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _growth(now: int, base: int) -> str:
    delta = now - base
    sign = "+" if delta >= 0 else "-"
    return f"{sign}{abs(delta) / (1 << 20):.2f} MiB"


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed piece of a generation.

    `position` is the absolute position (prompt tokens + generated tokens so
    far) after this chunk. The final chunk has empty `text`/`tokens` and
    carries `stats` and `finish_reason`.
    """

    text: str
    tokens: list[int]
    position: int
    stats: GenerationStats | None = None
    finish_reason: FinishReason | None = None

    @property
    def is_final(self) -> bool:
        return self.stats is not None


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation, as collected from a stream."""

    prompt_tokens: int
    generated_tokens: list[int]
    text: str
    stats: GenerationStats
    finish_reason: FinishReason | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.stats.decode_tokens_per_second

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.stats.prefill_tokens_per_second

    @property
    def time_to_first_token_s(self) -> float:
        return self.stats.time_to_first_token_ms / 1000.0


_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True)
class GenerationParameters:
    """Sampling and stopping controls for one request.

    `temperature=None` means the model's generation_config value, else 0.6;
    0 is greedy. `repetition_context_size=None` means the whole history.
    """

    max_tokens: int = 256
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_on_eos: bool = True
    prefill_step_size: int | None = None

    def __post_init__(self) -> None:
        problems = list(_parameter_problems(self))
        if problems:
            raise ValueError("invalid generation parameters: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Wire form: only fields that differ from the defaults, logit_bias keys as strings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value == _DEFAULTS[f.name]:
                continue
            if f.name == "logit_bias":
                value = {str(k): float(v) for k, v in value.items()}
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationParameters:
        """Build from a wire map. Unknown keys are ignored; bad values raise ValueError."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            kwargs[f.name] = _coerce_field(f.name, data[f.name])
        return cls(**kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float))) and not isinstance(value, bool)


_INT_FIELDS = {"max_tokens", "top_k"}
_OPT_INT_FIELDS = {"repetition_context_size", "seed", "prefill_step_size"}
_FLOAT_FIELDS = {
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
}


def _coerce_field(name: str, value: Any) -> Any:
    """Check one wire field's type and convert it to the dataclass's type."""
    if name in _INT_FIELDS or (name in _OPT_INT_FIELDS and value is not None):
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
        return value
    if name in _OPT_INT_FIELDS:
        return None
    if name in _FLOAT_FIELDS or (name == "temperature" and value is not None):
        if not _is_number(value):
            raise ValueError(f"{name} must be a number, got {type(value).__name__}")
        return float(value)
    if name == "temperature":
        return None
    if name == "stop_on_eos":
        if not isinstance(value, bool):
            raise ValueError("stop_on_eos must be a boolean")
        return value
    if name == "logit_bias":
        return _coerce_logit_bias(value)
    if name == "stop":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a list of strings")
        return list(value)
    if name == "stop_token_ids":
        if not isinstance(value, list) or not all(_is_int(t) for t in value):
            raise ValueError("stop_token_ids must be a list of integers")
        return list(value)
    raise ValueError(f"unknown parameter {name}")  # pragma: no cover - fields are closed


def _coerce_logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, Mapping):
        raise ValueError("logit_bias must be a map from token id to bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key) if isinstance(key, str) else key
        except ValueError:
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if not _is_int(token):
            raise ValueError(f"logit_bias key {key!r} is not a token id")
        if not _is_number(bias):
            raise ValueError(f"logit_bias value for {key!r} must be a number")
        out[token] = float(bias)
    return out


def _parameter_problems(p: GenerationParameters) -> Sequence[str]:
    """Every reason the parameters are unusable, in field order."""
    problems: list[str] = []

    def finite(name: str, value: float) -> bool:
        if math.isnan(value) or math.isinf(value):
            problems.append(f"{name} must be finite, got {value}")
            return False
        return True

    if not 1 <= p.max_tokens <= _MAX_TOKEN_ID:
        problems.append(f"max_tokens must be between 1 and {_MAX_TOKEN_ID}, got {p.max_tokens}")
    if p.temperature is not None and finite("temperature", p.temperature):
        if not 0.0 <= p.temperature <= 100.0:
            problems.append(f"temperature must be in [0, 100], got {p.temperature}")
    if finite("top_p", p.top_p) and not 0.0 < p.top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1], got {p.top_p}")
    if not 0 <= p.top_k <= _MAX_TOKEN_ID:
        problems.append(f"top_k must be >= 0 (0 disables), got {p.top_k}")
    if finite("min_p", p.min_p) and not 0.0 <= p.min_p <= 1.0:
        problems.append(f"min_p must be in [0, 1], got {p.min_p}")
    if finite("repetition_penalty", p.repetition_penalty) and p.repetition_penalty <= 0:
        problems.append(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    if p.repetition_context_size is not None and not 1 <= p.repetition_context_size <= (
        _MAX_TOKEN_ID
    ):
        problems.append("repetition_context_size must be a positive integer or None")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if finite(name, value) and abs(value) > 100:
            problems.append(f"{name} must be in [-100, 100], got {value}")
    for token, bias in p.logit_bias.items():
        if not 0 <= token <= _MAX_TOKEN_ID:
            problems.append(f"logit_bias token id {token} is out of range")
        if math.isnan(bias):
            problems.append(f"logit_bias for token {token} is NaN")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        problems.append(f"seed must be in [0, 2**64), got {p.seed}")
    if any(s == "" for s in p.stop):
        problems.append("stop strings must not be empty")
    if any(not 0 <= t <= _MAX_TOKEN_ID for t in p.stop_token_ids):
        problems.append("stop_token_ids must be valid token ids")
    if p.prefill_step_size is not None and not 1 <= p.prefill_step_size <= 1 << 20:
        problems.append("prefill_step_size must be a positive integer or None")
    return problems


_DEFAULTS: dict[str, Any] = {
    "max_tokens": 256,
    "temperature": None,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "repetition_context_size": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "stop_on_eos": True,
    "prefill_step_size": None,
}


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn. `content` is a string or a list of parts ({"type": "text", ...})."""

    role: str
    content: MessageContent | None = ""
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The template-facing (and wire) form: omitted optionals stay absent."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        for key in ("thinking", "tool_calls", "tool_call_id", "name"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatMessage:
        if not isinstance(data, Mapping):
            raise ValueError("a chat message must be a map")
        role = data.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError("a chat message needs a non-empty string role")
        content = data.get("content", "")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError("message content must be a string, a list of parts, or nil")
        if isinstance(content, list) and not all(isinstance(p, Mapping) for p in content):
            raise ValueError("message content parts must be maps")
        thinking = data.get("thinking", data.get("reasoning_content"))
        tool_calls = data.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise ValueError("tool_calls must be a list")
        for key in ("tool_call_id", "name"):
            if data.get(key) is not None and not isinstance(data.get(key), str):
                raise ValueError(f"{key} must be a string")
        if thinking is not None and not isinstance(thinking, str):
            raise ValueError("thinking must be a string")
        return cls(
            role=role,
            content=content,
            thinking=thinking,
            tool_calls=tool_calls,
            tool_call_id=data.get("tool_call_id"),
            name=data.get("name"),
        )


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How to render a conversation through the model's chat template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    enable_thinking: bool | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Wire form: only fields that differ from the defaults."""
        out: dict[str, Any] = {}
        defaults = ChatTemplateOptions()
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatTemplateOptions:
        if not isinstance(data, Mapping):
            raise ValueError("chat options must be a map")
        kwargs: dict[str, Any] = {}
        for key in ("add_generation_prompt", "continue_final_message"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ValueError(f"{key} must be a boolean")
                kwargs[key] = data[key]
        if data.get("enable_thinking") is not None:
            if not isinstance(data["enable_thinking"], bool):
                raise ValueError("enable_thinking must be a boolean or nil")
            kwargs["enable_thinking"] = data["enable_thinking"]
        for key in ("tools", "documents"):
            if data.get(key) is not None:
                if not isinstance(data[key], list):
                    raise ValueError(f"{key} must be a list")
                kwargs[key] = data[key]
        if "extra" in data:
            if not isinstance(data["extra"], Mapping) or not all(
                isinstance(k, str) for k in data["extra"]
            ):
                raise ValueError("extra must be a map with string keys")
            kwargs["extra"] = dict(data["extra"])
        return cls(**kwargs)
