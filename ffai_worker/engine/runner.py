"""The model runner: executes a scheduler's StepPlan on the model and the KV cache.

It owns everything that touches MLX in a step: the batched prefill of fresh
prompts, prompt chunks, the pipelined batched decode and sampling, memory
readings, and the KV slots (acquired on admission, compacted on release, as the
scheduler's plan and completion say). Sampled tokens go to their sequences
(`Sequence.accept`), which stream text and decide when to stop.

Prefix cache: it copies each admitted sequence's planned hit into its slot,
and remembers KV for later requests: a prompt once prefilled (so requests
running together share a system prompt), and everything a sequence's slot
holds when it leaves (prompt and reply; a cancelled prompt's prefilled part).
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx

from ffai_worker.engine.constraints import allowed_mask
from ffai_worker.engine.decoder import BatchedDecoder
from ffai_worker.engine.kv_cache import SlotCache
from ffai_worker.engine.logprobs import Draw, draw
from ffai_worker.engine.prefill import prefill_group_logits
from ffai_worker.engine.prefix_cache import PrefixCache
from ffai_worker.engine.scheduler import PrefillChunk, Release, StepPlan
from ffai_worker.engine.sequence import Sequence

# A launched decode whose tokens are not read back yet: the rows it decoded, its draw.
Inflight = tuple[tuple[Sequence, ...], Draw]


class ModelRunner:
    def __init__(
        self,
        model: Any,
        cache: SlotCache,
        *,
        context_length: int,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.prefix = prefix
        self.context_length = context_length
        self.decoder = BatchedDecoder(model, cache)
        self.steps = 0  # forward steps taken (tests observe progress by it)
        self.pipeline = True  # overlap each decode step with the previous one's readback
        self._inflight: Inflight | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a launched decode's tokens are still to be read back."""
        return self._inflight is not None

    def execute(self, plan: StepPlan) -> None:
        """Run the plan: take slots, prefill, decode; hand every sampled token to its sequence."""
        for seq in plan.admitted:
            slot = self.cache.acquire()
            assert slot == seq.slot, (slot, seq.slot)
            if seq.prefix_hit is not None:
                self._copy_hit(seq, slot)
        if not plan.running:
            return
        mx.reset_peak_memory()
        self.steps += 1
        if plan.group:
            self._prefill_group(plan.group)
        for chunk in plan.chunks:
            self._prefill_chunk(chunk)
        self._decode(plan)
        self._note_peaks(plan.running)

    def release(self, releases: tuple[Release, ...], running: int) -> None:
        """Free the finished sequences' slots, compacting as the scheduler did."""
        for release in releases:
            release.seq.timings.kv_capacity = self.cache.capacity
            self._remember(release.seq, release.slot)
            moved = self.cache.release(release.slot)
            assert moved == release.moved, (moved, release.moved)
        if not running:
            self._inflight = None  # only finished rows were left in flight

    def reset(self) -> None:
        """Forget all state after a failed step: nothing in flight, every slot free."""
        self._inflight = None
        self.cache.reset()
        if self.prefix is not None:
            self.prefix.clear()  # what a failed step wrote cannot be trusted

    # -- prefix cache --------------------------------------------------------
    def _copy_hit(self, seq: Sequence, slot: int) -> None:
        """Copy the planned cached prefix into the fresh slot; prefill starts after it."""
        hit, seq.prefix_hit = seq.prefix_hit, None
        assert hit is not None
        seq.timings.prefill_started = t0 = time.perf_counter()
        self.cache.put(slot, hit.parts)
        mx.eval(self.cache.keys, self.cache.values)
        seq.timings.prefill_busy_s += time.perf_counter() - t0

    def _remember(self, seq: Sequence, slot: int, length: int | None = None) -> None:
        """Offer the first `length` tokens (default: all the slot holds) to the prefix cache."""
        if self.prefix is None or not self.prefix.enabled:
            return
        tokens = seq.stored_tokens
        # Positions past the tokens, if any, hold a token fed after a cancel: not the sequence's.
        stored = min(self.cache.lengths[slot], len(tokens))
        if length is not None:
            stored = min(stored, length)
        taken = []

        def take(start: int, end: int) -> Any:
            taken.append(segment := self.cache.take(slot, start, end))
            return segment

        self.prefix.insert(tokens[:stored], take)
        if taken:
            # Waited for: a copy still queued would keep the whole slot buffer alive.
            mx.eval(*[(s.keys, s.values) for s in taken])

    # -- prefill -------------------------------------------------------------
    def _prefill_group(self, group: tuple[Sequence, ...]) -> None:
        """Prefill several whole prompts in one forward; each samples its first token."""
        t0 = time.perf_counter()
        slots = [_slot(s) for s in group]
        prompts = [list(s.prompt_ids) for s in group]
        logits = prefill_group_logits(self.model, self.cache, slots, prompts)
        drawn = _draw(group, logits)
        mx.eval(*drawn.arrays(), self.cache.keys, self.cache.values)
        now = time.perf_counter()
        memory = mx.get_active_memory()
        for seq, token, logprob in zip(group, *drawn.read(), strict=True):
            seq.timings.prefill_started = t0
            seq.timings.prefill_busy_s += now - t0
            seq.accept(token, now, self.context_length, logprob)
            seq.timings.post_prefill_memory = memory
            self._remember(seq, _slot(seq), len(seq.prompt_ids))

    def _prefill_chunk(self, chunk: PrefillChunk) -> None:
        """Run one chunk of a prompt; sample the first token after the last chunk."""
        seq, start, size = chunk.seq, chunk.start, chunk.size
        t0 = time.perf_counter()
        if seq.timings.prefill_started is None:
            seq.timings.prefill_started = t0
        views = self.cache.prefill_views(_slot(seq), start, size)
        inputs = mx.array([seq.prompt_ids[start : start + size]], dtype=mx.int32)  # (1, L)
        scored = seq.params.prompt_logprobs
        if (not chunk.completes or seq.warm) and not scored:
            # Only the cache matters for a middle chunk (or a warm-up): no logits.
            self.model(inputs, cache=views)
            mx.eval(self.cache.keys, self.cache.values)
            now = time.perf_counter()
            seq.timings.prefill_busy_s += now - t0
            if chunk.completes:
                seq.finish_warm(now)  # its KV is remembered as its slot is released
            return
        if scored:
            logits = self._scored_logits(seq, inputs, views, start)
            if not chunk.completes or seq.warm:
                now = time.perf_counter()
                seq.timings.prefill_busy_s += now - t0
                if chunk.completes:
                    seq.finish_warm(now)  # a scored warm-up: its prompt logprobs, no token
                return
        else:
            logits = self._last_logits(inputs, views)  # (1, V)
        drawn = _draw((seq,), logits)
        mx.eval(*drawn.arrays(), self.cache.keys, self.cache.values)
        now = time.perf_counter()
        seq.timings.prefill_busy_s += now - t0
        tokens, logprobs = drawn.read()
        seq.accept(tokens[0], now, self.context_length, logprobs[0])
        seq.timings.post_prefill_memory = mx.get_active_memory()
        self._remember(seq, _slot(seq), len(seq.prompt_ids))

    def _scored_logits(
        self, seq: Sequence, inputs: mx.array, views: list[Any], start: int
    ) -> mx.array:
        """A chunk's forward over every position: record the logprob of each next prompt
        token (SPEC 6.6, raw logits) and return the last position's logits (1, V)."""
        logits = self.model(inputs, cache=views)  # (1, L, V): the price of scoring
        size = inputs.shape[1]
        targets = seq.prompt_ids[start + 1 : start + size + 1]
        scores: list[float] = []
        if targets:
            rows = logits[0, : len(targets)].astype(mx.float32)  # (T, V)
            picked = mx.take_along_axis(rows, mx.array(targets)[:, None], axis=-1)[:, 0]
            values = picked - mx.logsumexp(rows, axis=-1)
            mx.eval(values, self.cache.keys, self.cache.values)
            scores = values.tolist()
        seq.prompt_logprobs = (seq.prompt_logprobs or []) + scores
        return logits[:, -1, :]

    def _last_logits(self, inputs: mx.array, views: list[Any]) -> mx.array:
        # Project only the last position: the LM head over a whole chunk is wasted work.
        return self.model(inputs, cache=views, last_only=True)[:, -1, :]  # (1, V)

    # -- decode --------------------------------------------------------------
    def _decode(self, plan: StepPlan) -> None:
        """One batched forward: a token for every sequence the plan decodes.

        Pipelined like mlx-lm's generate_step: when the decoding set is the
        same as last step's, the new forward is built on last step's still
        lazy tokens and launched with `async_eval` before those tokens are
        read back, so graph building and Python bookkeeping overlap compute.
        Rows that finished in the meantime just waste one token's work.
        """
        running = plan.running
        decoding = _unfinished(plan.decode)
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not (inflight[0] == decoding and len(decoding) == len(running)):
            self._settle(inflight)  # the batch changed: settle before rebuilding
            inflight = None
            decoding = _unfinished(decoding)
        if not decoding:
            return
        if inflight is not None:
            inputs = inflight[1].tokens[:, None]  # (B, 1), still lazy
        else:
            inputs = mx.array(
                [[s.last_token if s in decoding else 0] for s in running], dtype=mx.int32
            )  # (B, 1)
        logits = self._logits(inputs, running, decoding)
        if inflight is not None and any(s.constraint is not None for s in decoding):
            # A grammar needs last step's tokens consumed before its next mask: launch this
            # forward, settle last step while it runs, then sample under the new masks.
            mx.async_eval(logits, self.cache.keys, self.cache.values)
            self._settle(inflight)
            inflight = None
        drawn = _draw(decoding, logits)
        if inflight is not None or self._pipelinable(decoding):
            mx.async_eval(*drawn.arrays(), self.cache.keys, self.cache.values)
            self._inflight = (decoding, drawn)
        else:
            mx.eval(*drawn.arrays(), self.cache.keys, self.cache.values)
            self._settle((decoding, drawn))
        if inflight is not None:
            self._settle(inflight)

    def _pipelinable(self, decoding: tuple[Sequence, ...]) -> bool:
        # A penalty needs the previous token in its history before sampling is even
        # built: such batches run in lockstep. (Grammars settle mid-step, see _decode.)
        return self.pipeline and not any(s.sampler.uses_history for s in decoding)

    def _logits(
        self, inputs: mx.array, running: tuple[Sequence, ...], decoding: tuple[Sequence, ...]
    ) -> mx.array:
        """Build (lazily) one decode forward; return the decoding rows' logits (B_dec, V)."""
        active = [s in decoding for s in running]
        logits = self.decoder(inputs, active)  # (B, V)
        if len(decoding) != len(running):
            rows = [i for i, ok in enumerate(active) if ok]
            logits = logits[mx.array(rows)]
        return logits

    def _settle(self, step: Inflight) -> None:
        """Read a step's tokens back and hand each to its sequence."""
        decoding, drawn = step
        tokens, logprobs = drawn.read()
        now = time.perf_counter()
        for seq, token, logprob in zip(decoding, tokens, logprobs, strict=True):
            if seq.finish_reason is not None:
                continue  # finished (or cancelled) after this step was launched
            seq.timings.max_batch = max(seq.timings.max_batch, len(decoding))
            seq.accept(token, now, self.context_length, logprob)

    def _note_peaks(self, running: tuple[Sequence, ...]) -> None:
        peak = mx.get_peak_memory()
        for seq in running:
            t = seq.timings
            if t.in_prefill_or_first_token():
                t.prefill_peak = max(t.prefill_peak, peak)
            else:
                t.decode_peak = max(t.decode_peak, peak)


def _draw(seqs: tuple[Sequence, ...], logits: mx.array) -> Draw:
    """Sample one token per row of logits (B, V), under each row's grammar mask if any."""
    # A row that finished while this step was in flight only wastes its token: no mask.
    constraints = [s.constraint if s.finish_reason is None else None for s in seqs]
    allowed = None
    if any(c is not None for c in constraints):
        # The mask fill (llguidance threads, no GIL) overlaps the forward computing the logits.
        mx.async_eval(logits)
        allowed = allowed_mask(constraints, logits.shape[-1])
    samplers = [s.sampler for s in seqs]
    return draw(samplers, logits, [s.history for s in seqs], allowed)


def _unfinished(seqs: tuple[Sequence, ...]) -> tuple[Sequence, ...]:
    return tuple(s for s in seqs if s.finish_reason is None)


def _slot(seq: Sequence) -> int:
    assert seq.slot is not None, "a sequence the plan runs holds a slot"
    return seq.slot
