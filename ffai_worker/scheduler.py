"""Continuous batching: the one loop where tokens are produced.

Each `step()`:
1. ends sequences whose cancel arrived (at this token boundary),
2. admits waiting sequences into free KV slots (up to `max_batch`),
3. spends a token budget on prefill chunks, oldest sequence first, so a long
   prompt is spread over several steps instead of freezing running streams,
4. runs one batched forward that decodes one token for every sequence past
   prefill, and
5. ends the sequences that stopped, releasing their KV slots.
Sequences join and leave only at step boundaries. The in-process
`Engine.generate_stream` and the worker both drive this same loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ffai_client.types import GenerationStats
from ffai_worker.decoder import BatchedDecoder
from ffai_worker.kv_cache import SlotCache
from ffai_worker.prefill import prefill_group_logits
from ffai_worker.sampling import sample_batch
from ffai_worker.sequence import Phase, RequestRejected, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # sequences decoding together
    max_queue: int = 64  # sequences waiting for a slot; more → `busy`
    prefill_step_size: int = 512  # prompt tokens prefilled per step, over all sequences


class Scheduler:
    def __init__(
        self,
        model: Any,
        cache: SlotCache,
        *,
        context_length: int,
        weights_bytes: int,
        config: SchedulerConfig,
    ) -> None:
        self.model = model
        self.cache = cache
        self.context_length = context_length
        self.weights_bytes = weights_bytes
        self.config = config
        self.decoder = BatchedDecoder(model, cache)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV slot
        self.steps = 0  # forward steps taken (tests observe progress by it)
        self._by_key: dict[Hashable, Sequence] = {}
        self.pipeline = True  # overlap each decode step with the previous one's readback
        self._inflight: tuple[list[Sequence], mx.array] | None = None

    # -- admission and cancel ------------------------------------------------
    def add(self, seq: Sequence) -> None:
        # Only requests that will really wait count: not those a free slot takes at the
        # next step, nor waiters already cancelled (they leave at the next step).
        queued = sum(1 for s in self.waiting if not s.cancel_requested)
        free_slots = max(0, self.config.max_batch - len(self.running))
        if queued + 1 - free_slots > self.config.max_queue:
            raise RequestRejected(
                "busy", f"the waiting queue is full ({self.config.max_queue} requests)"
            )
        seq.timings.baseline_memory = mx.get_active_memory()
        self.waiting.append(seq)
        self._by_key[seq.key] = seq

    def cancel(self, key: Hashable) -> bool:
        """Mark a live sequence cancelled; it ends at the next step. Unknown keys: no-op."""
        seq = self._by_key.get(key)
        if seq is None or seq.finish_reason is not None:
            return False
        seq.cancel_requested = True
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, key: Hashable) -> Sequence | None:
        return self._by_key.get(key)

    def abort_all(self) -> list[Hashable]:
        """Drop every sequence after a failed step (their state cannot be trusted).

        Returns their keys; the KV cache is released, so the next request
        starts from a clean slate.
        """
        dropped = [*self.waiting, *self.running]
        for seq in dropped:
            seq.phase, seq.slot = Phase.FINISHED, None
        self.waiting.clear()
        self.running.clear()
        self._by_key.clear()
        self._inflight = None
        self.cache.reset()
        return [seq.key for seq in dropped]

    # -- the step ------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Advance every live sequence by at most one token; return those with output."""
        touched: list[Sequence] = []
        self._end_cancelled(touched)
        self._admit()
        if self.running:
            mx.reset_peak_memory()
            self.steps += 1
            self._prefill(touched)
            self._decode(touched)
            self._note_peaks()
        self._end_finished(touched)
        return touched

    def _end_cancelled(self, touched: list[Sequence]) -> None:
        for seq in [s for s in self.waiting if s.cancel_requested]:
            self.waiting.remove(seq)
            seq.finish_cancelled()
            self._finalize(seq, touched)
        for seq in self.running:
            if seq.cancel_requested and seq.finish_reason is None:
                seq.finish_cancelled()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting.popleft()
            seq.slot = self.cache.acquire()
            seq.phase = Phase.PREFILL
            self.running.append(seq)

    def _prefill(self, touched: list[Sequence]) -> None:
        budget = self.config.prefill_step_size
        group = self._fresh_group(budget)
        if len(group) > 1:
            budget -= self._prefill_group(group, touched)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.phase is not Phase.PREFILL or seq.finish_reason is not None:
                continue
            budget -= self._prefill_chunk(seq, budget)
            if seq.outbox or seq.finish_reason is not None:
                touched.append(seq)

    def _fresh_group(self, budget: int) -> list[Sequence]:
        """Waiting-to-prefill sequences whose whole prompts fit the budget together."""
        group: list[Sequence] = []
        longest = 0
        for seq in self.running:
            if seq.phase is not Phase.PREFILL or seq.finish_reason is not None:
                continue
            if seq.prefilled or seq.params.prefill_step_size is not None:
                continue
            width = max(longest, len(seq.prompt_ids))
            if width * (len(group) + 1) > budget:  # padded rows cost work too
                break
            group.append(seq)
            longest = width
        return group

    def _prefill_group(self, group: list[Sequence], touched: list[Sequence]) -> int:
        """Prefill several whole prompts in one forward; each samples its first token."""
        t0 = time.perf_counter()
        slots = [s.slot for s in group]
        assert all(slot is not None for slot in slots)
        prompts = [list(s.prompt_ids) for s in group]
        logits = prefill_group_logits(self.model, self.cache, slots, prompts)  # type: ignore[arg-type]
        tokens = sample_batch([s.sampler for s in group], logits, [s.history for s in group])
        mx.eval(tokens, self.cache.keys, self.cache.values)
        now = time.perf_counter()
        memory = mx.get_active_memory()
        for seq, token in zip(group, tokens.tolist(), strict=True):
            seq.timings.prefill_started = t0
            seq.timings.prefill_busy_s += now - t0
            seq.prefilled = len(seq.prompt_ids)
            seq.phase = Phase.DECODE
            seq.accept(int(token), now, self.context_length)
            seq.timings.post_prefill_memory = memory
            touched.append(seq)
        return max(len(p) for p in prompts) * len(group)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Run one chunk of `seq`'s prompt; sample its first token after the last chunk."""
        start = seq.prefilled
        size = min(len(seq.prompt_ids) - start, budget)
        if seq.params.prefill_step_size is not None:
            size = min(size, seq.params.prefill_step_size)
        t0 = time.perf_counter()
        if seq.timings.prefill_started is None:
            seq.timings.prefill_started = t0
        assert seq.slot is not None
        views = self.cache.prefill_views(seq.slot, start, size)
        inputs = mx.array([seq.prompt_ids[start : start + size]], dtype=mx.int32)  # (1, L)
        seq.prefilled += size
        if seq.prefilled < len(seq.prompt_ids):
            # Only the cache matters for a middle chunk: the logits are never computed.
            self.model(inputs, cache=views)
            mx.eval(self.cache.keys, self.cache.values)
            seq.timings.prefill_busy_s += time.perf_counter() - t0
            return size
        logits = self._last_logits(inputs, views)  # (1, V)
        token = sample_batch([seq.sampler], logits, [seq.history])
        mx.eval(token, self.cache.keys, self.cache.values)
        now = time.perf_counter()
        seq.timings.prefill_busy_s += now - t0
        seq.phase = Phase.DECODE
        seq.accept(int(token.item()), now, self.context_length)
        seq.timings.post_prefill_memory = mx.get_active_memory()
        return size

    def _last_logits(self, inputs: mx.array, views: list[Any]) -> mx.array:
        # Project only the last position: the LM head over a whole chunk is wasted work.
        return self.model(inputs, cache=views, last_only=True)[:, -1, :]  # (1, V)

    def _decode(self, touched: list[Sequence]) -> None:
        """One batched forward: a token for every sequence past prefill.

        Pipelined like mlx-lm's generate_step: when the decoding set is the
        same as last step's, the new forward is built on last step's still
        lazy tokens and launched with `async_eval` before those tokens are
        read back, so graph building and Python bookkeeping overlap compute.
        Rows that finished in the meantime just waste one token's work.
        """
        decoding = self._decoding()
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not (
            inflight[0] == decoding and len(decoding) == len(self.running)
        ):
            self._settle(inflight, touched)  # the batch changed: settle before rebuilding
            inflight = None
            decoding = self._decoding()
        if not decoding:
            return
        if inflight is not None:
            inputs = inflight[1][:, None]  # (B, 1), still lazy
        else:
            inputs = mx.array(
                [[s.last_token if s in decoding else 0] for s in self.running], dtype=mx.int32
            )  # (B, 1)
        tokens = self._forward(inputs, decoding)
        if inflight is not None or self._pipelinable(decoding):
            mx.async_eval(tokens, self.cache.keys, self.cache.values)
            self._inflight = (decoding, tokens)
        else:
            mx.eval(tokens, self.cache.keys, self.cache.values)
            self._settle((decoding, tokens), touched)
        if inflight is not None:
            self._settle(inflight, touched)

    def _decoding(self) -> list[Sequence]:
        return [s for s in self.running if s.phase is Phase.DECODE and s.finish_reason is None]

    def _pipelinable(self, decoding: list[Sequence]) -> bool:
        # A penalty needs the previous token in its history before sampling.
        return self.pipeline and not any(s.sampler.uses_history for s in decoding)

    def _forward(self, inputs: mx.array, decoding: list[Sequence]) -> mx.array:
        """Build (lazily) one decode step; return the sampled tokens (B_decoding,)."""
        active = [s in decoding for s in self.running]
        logits = self.decoder(inputs, active)  # (B, V)
        if len(decoding) != len(self.running):
            rows = [i for i, ok in enumerate(active) if ok]
            logits = logits[mx.array(rows)]
        return sample_batch([s.sampler for s in decoding], logits, [s.history for s in decoding])

    def _settle(self, step: tuple[list[Sequence], mx.array], touched: list[Sequence]) -> None:
        """Read a step's tokens back and hand each to its sequence."""
        decoding, tokens = step
        values = tokens.tolist()
        now = time.perf_counter()
        for seq, token in zip(decoding, values, strict=True):
            if seq.finish_reason is not None:
                continue  # finished (or cancelled) after this step was launched
            seq.timings.max_batch = max(seq.timings.max_batch, len(decoding))
            seq.accept(int(token), now, self.context_length)
            if seq not in touched:
                touched.append(seq)

    def _note_peaks(self) -> None:
        peak = mx.get_peak_memory()
        for seq in self.running:
            t = seq.timings
            if seq.phase is Phase.PREFILL or t.first_token is None or t.last_token == t.first_token:
                t.prefill_peak = max(t.prefill_peak, peak)
            else:
                t.decode_peak = max(t.decode_peak, peak)

    def _end_finished(self, touched: list[Sequence]) -> None:
        done = [s for s in self.running if s.finish_reason is not None]
        for seq in done:
            self._release(seq)
            self._finalize(seq, touched)
        if not self.running:
            self._inflight = None  # only finished rows were left in flight

    def _release(self, seq: Sequence) -> None:
        assert seq.slot is not None
        slot = seq.slot
        seq.timings.kv_capacity = self.cache.capacity
        moved = self.cache.release(slot)
        last = self.running.pop()
        if moved is not None:
            assert last.slot == moved
            self.running[slot] = last
            last.slot = slot
        seq.slot = None

    def _finalize(self, seq: Sequence, touched: list[Sequence]) -> None:
        stats = self._stats(seq)
        seq.phase = Phase.FINISHED
        seq.outbox.append(seq.final_chunk(stats))
        self._by_key.pop(seq.key, None)
        if seq not in touched:
            touched.append(seq)

    def _stats(self, seq: Sequence) -> GenerationStats:
        t = seq.timings
        now = time.perf_counter()
        prefill_start = t.prefill_started if t.prefill_started is not None else now
        first = t.first_token if t.first_token is not None else now
        last = t.last_token if t.last_token is not None else first
        steady = None
        if t.tenth_token is not None and len(seq.generated) > 10 and last > t.tenth_token:
            steady = (len(seq.generated) - 10) / (last - t.tenth_token)
        bpt = self.cache.bytes_per_token
        return GenerationStats(
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.generated),
            context_size=self.context_length,
            queue_time_s=prefill_start - t.submitted,
            prefill_time_s=first - prefill_start if t.first_token is not None else 0.0,
            decode_time_s=last - first,
            time_to_first_token_ms=(first - t.submitted) * 1000.0 if t.first_token else 0.0,
            steady_tokens_per_second=steady,
            baseline_memory_bytes=t.baseline_memory,
            post_prefill_memory_bytes=t.post_prefill_memory or t.baseline_memory,
            post_decode_memory_bytes=mx.get_active_memory(),
            prefill_peak_memory_bytes=t.prefill_peak,
            decode_peak_memory_bytes=t.decode_peak,
            weights_bytes=self.weights_bytes,
            kv_cache_allocated_bytes=t.kv_capacity * bpt,
            kv_cache_used_bytes=(seq.position if t.kv_capacity else 0) * bpt,
            cached_prompt_tokens=0,
            max_batch_size=t.max_batch,
        )
