"""The scheduler: decides what each engine step does, and never touches the model.

Split as in vLLM v1: `Scheduler.schedule()` turns the queues into a frozen
`StepPlan` (which waiting sequences end cancelled, which are admitted to which
KV slot, which prompts prefill how many tokens, which sequences decode), the
model runner (runner.py) executes it, and `Scheduler.complete()` releases the
sequences that finished during it. The scheduler keeps the sequences'
bookkeeping (phase, prompt tokens planned, slot) and no tensor, so its rules are
unit-tested without a model (tests/test_scheduler.py).

Policy: FIFO admission up to `max_batch` running sequences; a bounded waiting
queue (overflow → `busy`); every step, fresh prompts that fit the prefill token
budget whole are prefilled together, the rest of the budget goes to prompt
chunks in slot order, and every running sequence past prefill decodes one token,
so a long prompt never freezes running streams.

Prefix cache: at admission the scheduler looks the prompt up in the prefix
cache (prefix_cache.py, no model either) and plans the hit: the sequence's
first `cached` prompt tokens are copied into its slot by the runner, and its
prefill chunks start after them. The last prompt token is always prefilled,
since its logits give the first sampled token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ffai_worker.engine.prefix_cache import PrefixCache
from ffai_worker.engine.sequence import Phase, RequestRejected, Sequence
from ffai_worker.engine.types import EngineLoad, RequestKey


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # sequences decoding together
    max_queue: int = 64  # sequences waiting for a slot; more → `busy`
    prefill_step_size: int = 512  # prompt tokens prefilled per step, over all sequences


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens [start, start + size) of `seq`, run into its KV slot."""

    seq: Sequence
    start: int
    size: int

    @property
    def completes(self) -> bool:
        """The prompt's last chunk: the runner samples the first token after it."""
        return self.start + self.size == len(self.seq.prompt_ids)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one step does, decided before any model work."""

    ended: tuple[Sequence, ...]  # waiting sequences cancelled before they ran (no slot)
    # Took the KV slot `seq.slot` this step, in order; those with a `prefix_hit` get
    # its `cached` tokens copied into the slot before any prefill.
    admitted: tuple[Sequence, ...]
    running: tuple[Sequence, ...]  # every sequence holding a slot, in slot order
    group: tuple[Sequence, ...]  # two or more whole fresh prompts, prefilled in one forward
    chunks: tuple[PrefillChunk, ...]  # prompt chunks, after the group
    # Sequences past prefill (or finishing it in this step) that take a decode token,
    # unless their prefill's first token or an in-flight token ends them first.
    decode: tuple[Sequence, ...]


@dataclass(frozen=True, slots=True)
class Release:
    """`seq` left `slot`; the sequence of slot `moved` (the last one) moved into it."""

    seq: Sequence
    slot: int
    moved: int | None


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of a step: running sequences that finished, and the slots they freed."""

    finished: tuple[Sequence, ...]
    releases: tuple[Release, ...]


class Scheduler:
    def __init__(self, config: SchedulerConfig, prefix: PrefixCache | None = None) -> None:
        self.config = config
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV slot
        self._by_key: dict[RequestKey, Sequence] = {}

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
        self.waiting.append(seq)
        self._by_key[seq.key] = seq

    def cancel(self, key: RequestKey) -> bool:
        """Mark a live sequence cancelled; it ends at the next step. Unknown keys: no-op."""
        seq = self._by_key.get(key)
        if seq is None or seq.finish_reason is not None:
            return False
        seq.cancel_requested = True
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, key: RequestKey) -> Sequence | None:
        return self._by_key.get(key)

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self.running), waiting=len(self.waiting))

    def abort_all(self) -> list[RequestKey]:
        """Drop every sequence after a failed step (their state cannot be trusted)."""
        dropped = [*self.waiting, *self.running]
        for seq in dropped:
            seq.phase, seq.slot = Phase.FINISHED, None
        self.waiting.clear()
        self.running.clear()
        self._by_key.clear()
        return [seq.key for seq in dropped]

    # -- planning a step -----------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step; the plan's prefill and decode are the runner's to execute."""
        ended = self._end_cancelled()
        admitted = self._admit()
        group: tuple[Sequence, ...] = ()
        chunks: tuple[PrefillChunk, ...] = ()
        if self.running:
            group, chunks = self._plan_prefill()
        decode = tuple(
            s
            for s in self.running
            if s.phase is Phase.DECODE and s.finish_reason is None and not s.warm
        )
        return StepPlan(ended, admitted, tuple(self.running), group, chunks, decode)

    def _end_cancelled(self) -> tuple[Sequence, ...]:
        ended = tuple(s for s in self.waiting if s.cancel_requested)
        for seq in ended:
            self.waiting.remove(seq)
            seq.finish_cancelled()
            self._retire(seq)
        for seq in self.running:
            if seq.cancel_requested and seq.finish_reason is None:
                seq.finish_cancelled()  # released by complete(), after the step
        return ended

    def _admit(self) -> tuple[Sequence, ...]:
        admitted = []
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            seq.phase = Phase.PREFILL
            self.running.append(seq)
            admitted.append(seq)
            self._plan_hit(seq)
        return tuple(admitted)

    def _plan_hit(self, seq: Sequence) -> None:
        if self.prefix is None or seq.params.prompt_logprobs:
            return  # a scored prompt needs the logits of every position: no cached ones
        hit = self.prefix.match(seq.prompt_ids, len(seq.prompt_ids) - 1)
        if hit is not None:
            seq.prefix_hit = hit
            seq.cached = seq.prefilled = hit.length

    def _plan_prefill(self) -> tuple[tuple[Sequence, ...], tuple[PrefillChunk, ...]]:
        budget = self.config.prefill_step_size
        group = self._fresh_group(budget)
        if len(group) > 1:
            budget -= max(len(s.prompt_ids) for s in group) * len(group)  # padded rows cost too
            for seq in group:
                seq.prefilled = len(seq.prompt_ids)
                seq.phase = Phase.DECODE
        else:
            group = []  # one fresh prompt takes the chunked path
        chunks = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.phase is not Phase.PREFILL or seq.finish_reason is not None:
                continue
            start = seq.prefilled
            size = min(len(seq.prompt_ids) - start, budget)
            if seq.params.prefill_step_size is not None:
                size = min(size, seq.params.prefill_step_size)
            chunk = PrefillChunk(seq, start, size)
            seq.prefilled += size
            if chunk.completes:
                seq.phase = Phase.DECODE
            chunks.append(chunk)
            budget -= size
        return tuple(group), tuple(chunks)

    def _fresh_group(self, budget: int) -> list[Sequence]:
        """Sequences yet to prefill whose whole prompts fit the budget together."""
        group: list[Sequence] = []
        longest = 0
        for seq in self.running:
            if seq.phase is not Phase.PREFILL or seq.finish_reason is not None:
                continue
            if seq.prefilled or seq.warm or seq.params.prefill_step_size is not None:
                continue  # a hit, a warm-up (no logits) or a caller's chunking: the chunk path
            if seq.params.prompt_logprobs:
                continue  # scored prompts need every position's logits: the chunked path
            width = max(longest, len(seq.prompt_ids))
            if width * (len(group) + 1) > budget:  # padded rows cost work too
                break
            group.append(seq)
            longest = width
        return group

    # -- ending a step -------------------------------------------------------
    def complete(self) -> Completion:
        """After the runner executed the plan: free the slots of finished sequences."""
        finished = tuple(s for s in self.running if s.finish_reason is not None)
        releases = tuple(self._release(seq) for seq in finished)
        for seq in finished:
            self._retire(seq)
        return Completion(finished, releases)

    def _release(self, seq: Sequence) -> Release:
        # Compaction: the last slot's sequence moves into the freed slot, as SlotCache does.
        slot = seq.slot
        assert slot is not None
        last_slot = len(self.running) - 1
        last = self.running.pop()
        moved = None
        if slot != last_slot:
            self.running[slot] = last
            last.slot = slot
            moved = last_slot
        seq.slot = None
        return Release(seq, slot, moved)

    def _retire(self, seq: Sequence) -> None:
        seq.phase = Phase.FINISHED
        self._by_key.pop(seq.key, None)
