"""One request's clock readings and memory counters, and the GenerationStats made from them.

Everything a request's stats need is recorded here as it happens (by the
sequence for tokens, by the model runner for prefill and memory) and turned into
`GenerationStats` in one place, `Timings.stats`. No MLX: the caller passes the
memory and cache figures in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ffai_client.types import GenerationStats

STEADY_AFTER = 10  # steady decode speed counts tokens after the tenth


@dataclass(frozen=True, slots=True)
class Footprint:
    """Engine-wide figures a request's stats report beside its own clock readings."""

    context_length: int
    weights_bytes: int
    kv_bytes_per_token: int
    active_memory: int  # bytes in use now, as the request ends


@dataclass
class Timings:
    """Clock readings (time.perf_counter) and memory counters of one request."""

    submitted: float = field(default_factory=time.perf_counter)
    prefill_started: float | None = None
    first_token: float | None = None
    tenth_token: float | None = None
    last_token: float | None = None
    prefill_busy_s: float = 0.0
    baseline_memory: int = 0
    post_prefill_memory: int = 0
    prefill_peak: int = 0
    decode_peak: int = 0
    max_batch: int = 1
    kv_capacity: int = 0  # positions the sequence's slot held when released

    def on_token(self, now: float, generated: int) -> None:
        """The `generated`-th token was sampled at `now`."""
        if self.first_token is None:
            self.first_token = now
        if generated == STEADY_AFTER:
            self.tenth_token = now
        self.last_token = now

    def in_prefill_or_first_token(self) -> bool:
        """Whether this step's memory peak counts as the request's prefill peak."""
        return self.first_token is None or self.last_token == self.first_token

    def stats(
        self,
        prompt_tokens: int,
        generated_tokens: int,
        position: int,
        footprint: Footprint,
        cached_prompt_tokens: int = 0,
    ) -> GenerationStats:
        now = time.perf_counter()
        prefill_start = self.prefill_started if self.prefill_started is not None else now
        first = self.first_token if self.first_token is not None else now
        last = self.last_token if self.last_token is not None else first
        steady = None
        if (
            self.tenth_token is not None
            and generated_tokens > STEADY_AFTER
            and last > self.tenth_token
        ):
            steady = (generated_tokens - STEADY_AFTER) / (last - self.tenth_token)
        bpt = footprint.kv_bytes_per_token
        return GenerationStats(
            prompt_tokens=prompt_tokens,
            generated_tokens=generated_tokens,
            context_size=footprint.context_length,
            queue_time_s=prefill_start - self.submitted,
            prefill_time_s=first - prefill_start if self.first_token is not None else 0.0,
            decode_time_s=last - first,
            time_to_first_token_ms=(first - self.submitted) * 1000.0 if self.first_token else 0.0,
            steady_tokens_per_second=steady,
            baseline_memory_bytes=self.baseline_memory,
            post_prefill_memory_bytes=self.post_prefill_memory or self.baseline_memory,
            post_decode_memory_bytes=footprint.active_memory,
            prefill_peak_memory_bytes=self.prefill_peak,
            decode_peak_memory_bytes=self.decode_peak,
            weights_bytes=footprint.weights_bytes,
            kv_cache_allocated_bytes=self.kv_capacity * bpt,
            kv_cache_used_bytes=(position if self.kv_capacity else 0) * bpt,
            cached_prompt_tokens=cached_prompt_tokens,
            max_batch_size=self.max_batch,
        )
