"""Public value types shared by the client, the worker and the wire codec.

Everything here is plain data: no sockets, no MLX. The worker imports these
types too, so the in-process engine and the served path return the same
objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ffai_client._wire import ALWAYS, read_map, to_wire_map

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
        """Wire form: every field, always (SPEC 6.4), floats as floats."""
        return to_wire_map(self, omit_defaults=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationStats:
        """Build from a wire map; unknown keys are ignored (additive protocol)."""
        return cls(**read_map(cls, data))

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
class TopLogprob:
    """One candidate for a generated position: its id, text and log-probability."""

    token: int
    text: str
    logprob: float

    def to_dict(self) -> dict[str, Any]:
        return to_wire_map(self, omit_defaults=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TopLogprob:
        return cls(**read_map(cls, data))


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the `logprobs` most likely alternatives.

    From the distribution the token was drawn from: the model's logits after the
    grammar mask, logit bias and penalties, before temperature and truncation
    (SPEC 6.6); `top` is sorted by logprob, most likely first.
    """

    token: int
    text: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return to_wire_map(self, omit_defaults=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLogprob:
        if not isinstance(data, Mapping):
            raise ValueError("a token logprob must be a map")
        top = data.get("top") or []
        if not isinstance(top, list):
            raise ValueError("top must be an array")
        kwargs = read_map(cls, {k: v for k, v in data.items() if k != "top"})
        return cls(**kwargs, top=[TopLogprob.from_dict(t) for t in top])


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed piece of a generation.

    `position` is the absolute position (prompt tokens + generated tokens so
    far) after this chunk. The final chunk has empty `text`/`tokens` and
    carries `stats` and `finish_reason`. With `logprobs` requested, `logprobs`
    holds one entry per token of `tokens`; with `prompt_logprobs`, the first
    chunk carries the prompt's (one per prompt token after the first).
    """

    text: str
    tokens: list[int]
    position: int
    stats: GenerationStats | None = None
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float] | None = None

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
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when requested
    prompt_logprobs: list[float] | None = None  # prompt tokens 2..n, when requested

    @property
    def tokens_per_second(self) -> float:
        return self.stats.decode_tokens_per_second

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.stats.prefill_tokens_per_second

    @property
    def time_to_first_token_s(self) -> float:
        return self.stats.time_to_first_token_ms / 1000.0


class ResultBuilder:
    """Collects a stream's chunks into its `GenerationResult` (client and engine alike)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.prompt_logprobs: list[float] | None = None
        self.final: GenerationChunk | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.texts.append(chunk.text)
        self.tokens.extend(chunk.tokens)
        if chunk.logprobs is not None:  # present (maybe empty) in every chunk when requested
            self.logprobs = (self.logprobs or []) + list(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = list(chunk.prompt_logprobs)
        if chunk.is_final:
            self.final = chunk

    def result(self) -> GenerationResult | None:
        """The result, or None if no final chunk came."""
        final = self.final
        if final is None or final.stats is None:
            return None
        return GenerationResult(
            prompt_tokens=final.stats.prompt_tokens,
            generated_tokens=self.tokens,
            text="".join(self.texts),
            stats=final.stats,
            finish_reason=final.finish_reason,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )


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
    response_format: dict[str, Any] | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        problems = list(_parameter_problems(self))
        if problems:
            raise ValueError("invalid generation parameters: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Wire form: fields that differ from the defaults; logit_bias sorted, keys as strings."""
        return to_wire_map(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationParameters:
        """Build from a wire map. Unknown keys are ignored; bad values raise ValueError."""
        return cls(**read_map(cls, data))

    def check_vocabulary(self, vocab_size: int) -> None:
        """The rule only a loaded model can apply: logit_bias ids below its vocabulary size."""
        for token in self.logit_bias:
            if token >= vocab_size:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary")


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
    if p.response_format is not None:
        problems.extend(response_format_problems(p.response_format))
        if any(b == math.inf for b in p.logit_bias.values()):
            problems.append("a +inf logit_bias (a forced token) cannot be combined with a format")
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        problems.append(f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {p.logprobs}")
    return problems


MAX_LOGPROBS = 20
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar", "choice")


def response_format_problems(fmt: Mapping[str, Any]) -> list[str]:
    """The shape rules of `response_format` (whether it compiles is the worker's question)."""
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        return [f"response_format.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}"]
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else fmt.get("schema")
        if not isinstance(schema, Mapping):
            return ["response_format json_schema needs a map json_schema.schema (or schema)"]
    need = {"regex": "pattern", "grammar": "lark"}.get(str(kind))
    if need is not None and not (isinstance(fmt.get(need), str) and fmt[need]):
        return [f"response_format {kind} needs a non-empty str {need}"]
    if kind == "choice":
        choices = fmt.get("choices")
        if not (
            isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)
        ):
            return ["response_format choice needs a non-empty array of non-empty str choices"]
    return []


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn. `content` is a string or a list of parts ({"type": "text", ...})."""

    role: str
    # Always written (nil included): nil is a real value here, not absence (SPEC 6.3).
    content: MessageContent | None = field(default="", metadata={ALWAYS: True})
    thinking: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise ValueError("a chat message needs a non-empty string role")

    def to_dict(self) -> dict[str, Any]:
        """The template-facing (and wire) form: omitted optionals stay absent."""
        return to_wire_map(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatMessage:
        if not isinstance(data, Mapping):
            raise ValueError("a chat message must be a map")
        if data.get("thinking") is None and data.get("reasoning_content") is not None:
            data = {**data, "thinking": data["reasoning_content"]}  # the accepted alias
        kwargs = read_map(cls, data)
        if "content" in data and data["content"] is None:
            kwargs["content"] = None
        return cls(**kwargs)


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How to render a conversation through the model's chat template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    enable_thinking: bool | None = None
    tools: list[Any] | None = None
    documents: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Wire form: only fields that differ from the defaults."""
        return to_wire_map(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChatTemplateOptions:
        return cls(**read_map(cls, data))


PROMPT_INPUTS: tuple[str, ...] = ("prompt", "tokens", "messages")


def check_prompt_input(prompt: object, tokens: object, messages: object) -> None:
    """The one rule on a generation's input: exactly one of prompt, tokens, messages."""
    given = [
        n for n, v in zip(PROMPT_INPUTS, (prompt, tokens, messages), strict=True) if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of prompt, tokens or messages, got {' and '.join(given) or 'none'}"
        )
