"""One generation request's state as it moves through the scheduler and the model runner."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ffai_client.types import (
    GenerationChunk,
    GenerationParameters,
    GenerationStats,
    TokenLogprob,
    TopLogprob,
)
from ffai_worker.engine.timings import Timings
from ffai_worker.engine.types import RequestKey

if TYPE_CHECKING:
    from ffai_worker.engine.constraints import Constraint
    from ffai_worker.engine.prefix_cache import PrefixHit
    from ffai_worker.engine.sampling import Sampler, TokenHistory
    from ffai_worker.text.tokenizer import StreamingDetokenizer, Tokenizer


class RequestRejected(Exception):
    """A request the engine will not run; `code` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class EngineRequest:
    """A validated, tokenized request, ready to be scheduled."""

    key: RequestKey  # unique among live requests
    prompt_ids: list[int]
    params: GenerationParameters
    constraint: Constraint | None = None  # compiled response_format, in its start state
    warm: bool = False  # prefill only: no token, the prompt's KV stays in the prefix cache


# A sampled token's logprob and its top alternatives as (id, logprob), read back from MLX.
RawLogprob = tuple[float, list[tuple[int, float]]]


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


class StopStringMatcher:
    """Holds back text that may still turn into a stop string, so none of it is emitted."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string matched)."""
        if not self.stops:
            return delta, False
        text = self.held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = self._longest_partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def _longest_partial_suffix(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best


class Sequence:
    """A running request: its tokens, sampler, detokenizer, stop rules and outbox."""

    def __init__(
        self,
        request: EngineRequest,
        sampler: Sampler,
        history: TokenHistory,
        detokenizer: StreamingDetokenizer,
        stop_ids: set[int],
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.request = request
        self.key = request.key
        self.params = request.params
        self.prompt_ids = request.prompt_ids
        self.sampler = sampler
        self.history = history
        self.detokenizer = detokenizer
        self.stop_ids = stop_ids
        self.stops = StopStringMatcher(request.params.stop)
        self.constraint = request.constraint
        self.tokenizer = tokenizer  # for the text of logprob entries
        self.pending_logprobs: list[TokenLogprob] | None = None  # for the next chunk
        self.prompt_logprobs: list[float] | None = None  # set by prefill; sent once
        self.generated: list[int] = []
        self.phase = Phase.WAITING
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.warm = request.warm
        self.cached = 0  # prompt tokens copied from the prefix cache, not prefilled
        self.prefix_hit: PrefixHit | None = None  # planned at admission, copied by the runner
        self.slot: int | None = None
        self.cancel_requested = False
        self.finish_reason: str | None = None
        self.outbox: deque[GenerationChunk] = deque()
        self.timings = Timings()

    @property
    def position(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def accept(
        self, token: int, now: float, context_length: int, logprob: RawLogprob | None = None
    ) -> None:
        """Record one sampled token, emit its text, and decide whether to stop."""
        self.generated.append(token)
        self.history.append(token)
        self.timings.on_token(now, len(self.generated))
        if logprob is not None:
            self.pending_logprobs = [self._token_logprob(token, logprob)]
        if token in self.stop_ids:
            self._emit(self._flush_text(), [token])
            self.finish_reason = "stop"
            return
        # A grammar that cannot go on ends the sequence like a stop token (finish "stop").
        complete = self.constraint is not None and self.constraint.advance(token)
        text, matched = self.stops.feed(self.detokenizer.add(token))
        if matched or complete:
            self._emit(text + (self._flush_text() if complete and not matched else ""), [token])
            self.finish_reason = "stop"
            return
        if len(self.generated) >= self.params.max_tokens or self.position >= context_length:
            text += self._flush_text()
            self.finish_reason = "length"
        self._emit(text, [token])

    def _token_logprob(self, token: int, raw: RawLogprob) -> TokenLogprob:
        assert self.tokenizer is not None, "a sequence asked for logprobs knows its tokenizer"
        text = self.tokenizer.token_text
        top = [TopLogprob(token=t, text=text(t), logprob=lp) for t, lp in raw[1]]
        return TokenLogprob(token=token, text=text(token), logprob=raw[0], top=top)

    def _flush_text(self) -> str:
        text, matched = self.stops.feed(self.detokenizer.flush())
        return text if matched else text + self.stops.flush()

    def _emit(self, text: str, tokens: list[int]) -> None:
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = (self.pending_logprobs or []) if tokens else []
            self.pending_logprobs = None
        prompt, self.prompt_logprobs = self.prompt_logprobs, None
        self.outbox.append(
            GenerationChunk(
                text=text,
                tokens=tokens,
                position=self.position,
                logprobs=logprobs,
                prompt_logprobs=prompt,
            )
        )

    def finish_cancelled(self) -> None:
        """End at a token boundary; text already decoded but held back still goes out."""
        tail = self._flush_text()
        if tail:
            self._emit(tail, [])
        self.finish_reason = "cancelled"

    def finish_warm(self, now: float) -> None:
        """A prefill-only request ends once its prompt is in the cache: no token, `length`."""
        self.timings.first_token = self.timings.last_token = now
        self.finish_reason = "length"

    @property
    def stored_tokens(self) -> list[int]:
        """The tokens whose KV the slot holds, in order: the prompt, then those generated."""
        return self.prompt_ids + self.generated

    def take_chunks(self) -> tuple[GenerationChunk, ...]:
        """The chunks produced since the last call, oldest first."""
        chunks = tuple(self.outbox)
        self.outbox.clear()
        return chunks

    def final_chunk(self, stats: GenerationStats) -> GenerationChunk:
        assert self.finish_reason is not None
        return GenerationChunk(
            text="",
            tokens=[],
            position=self.position,
            stats=stats,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
        )


def new_sequence(
    request: EngineRequest, tokenizer: Tokenizer, *, default_temperature: float
) -> Sequence:
    """A request's sequence: its sampler, token history, detokenizer and stop ids."""
    from ffai_worker.engine.sampling import Sampler, TokenHistory
    from ffai_worker.text.tokenizer import StreamingDetokenizer

    params = request.params
    stop_ids = set(params.stop_token_ids)
    if params.stop_on_eos:
        stop_ids |= set(tokenizer.eos_token_ids)
    sampler = Sampler(
        params, vocab_size=tokenizer.vocab_size, default_temperature=default_temperature
    )
    history = TokenHistory(request.prompt_ids)
    detokenizer = StreamingDetokenizer(tokenizer, request.prompt_ids)
    return Sequence(request, sampler, history, detokenizer, stop_ids, tokenizer)
