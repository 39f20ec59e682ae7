"""The scheduler's rules, with no model: admission, budgets, queue limits, cancellation, fairness.

Sequences are real (real tokenizer, sampler and detokenizer); no model is loaded
and nothing runs a forward pass. `execute` stands in for the model runner's
contract: after a group or a prompt's last chunk the sequence gets its first
token, and every planned decode that is still unfinished gets one token.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import TINYSTORIES

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine.scheduler import (
    Completion,
    PrefillChunk,
    Release,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from ffai_worker.engine.sequence import (
    EngineRequest,
    Phase,
    RequestRejected,
    Sequence,
    new_sequence,
)
from ffai_worker.engine.types import RequestKey
from ffai_worker.text.tokenizer import Tokenizer

CONTEXT = 4096
TOKEN = 300  # any id that is neither EOS nor a stop token
TOKENIZER = Tokenizer.from_folder(TINYSTORIES)


def params(max_tokens: int = 100, **kw: object) -> GenerationParameters:
    return GenerationParameters(temperature=0.0, max_tokens=max_tokens, stop_on_eos=False, **kw)  # type: ignore[arg-type]


def seq(name: str, prompt_len: int = 4, **kw: object) -> Sequence:
    request = EngineRequest(RequestKey(b"c", name), [1] + [TOKEN] * (prompt_len - 1), params(**kw))
    return new_sequence(request, TOKENIZER, default_temperature=0.0)


def sched(max_batch: int = 4, max_queue: int = 4, budget: int = 512) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_batch=max_batch, max_queue=max_queue, prefill_step_size=budget)
    )


def execute(plan: StepPlan, s: Scheduler) -> Completion:
    """Play the model runner's part: hand out the tokens the plan samples, then complete."""
    now = time.perf_counter()
    for x in plan.group:
        x.accept(TOKEN, now, CONTEXT)
    for chunk in plan.chunks:
        if chunk.completes:
            chunk.seq.accept(TOKEN, now, CONTEXT)
    for x in plan.decode:
        if x.finish_reason is None:
            x.accept(TOKEN, now, CONTEXT)
    return s.complete()


def step(s: Scheduler) -> tuple[StepPlan, Completion]:
    plan = s.schedule()
    return plan, execute(plan, s)


def names(seqs: tuple[Sequence, ...]) -> list[str]:
    return [x.key.request_id for x in seqs]


def chunks(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(c.seq.key.request_id, c.start, c.size) for c in plan.chunks]


def test_the_scheduler_needs_no_mlx() -> None:
    code = "import sys, ffai_worker.engine.scheduler; sys.exit('mlx.core' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_admission_is_fifo_into_the_lowest_free_slots() -> None:
    s = sched(max_batch=2)
    a, b, c = seq("a", max_tokens=3), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    plan, done = step(s)
    assert names(plan.admitted) == ["a", "b"] and (a.slot, b.slot) == (0, 1)
    assert names(plan.running) == ["a", "b"] and list(s.waiting) == [c]
    assert c.phase is Phase.WAITING and c.slot is None
    # "a" ends at its third token: "b" moves into slot 0, then "c" takes slot 1.
    assert done.finished == ()
    plan, done = step(s)
    assert done.finished == (a,) and done.releases == (Release(a, 0, 1),)
    assert b.slot == 0 and a.slot is None and a.phase is Phase.FINISHED
    plan, _ = step(s)
    assert names(plan.admitted) == ["c"] and c.slot == 1 and names(plan.running) == ["b", "c"]


def test_releasing_the_last_slot_moves_nothing() -> None:
    s = sched()
    a, b = seq("a"), seq("b", max_tokens=1)
    s.add(a)
    s.add(b)
    _, done = step(s)
    assert done.releases == (Release(b, 1, None),) and a.slot == 0


def test_fresh_prompts_that_fit_the_budget_whole_prefill_together() -> None:
    s = sched(budget=16)
    a, b, c = seq("a", 3), seq("b", 4), seq("c", 5)
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule()
    assert plan.group == (a, b, c) and plan.chunks == ()  # 3 rows padded to 5: 15 <= 16
    assert plan.decode == (a, b, c)  # each samples its first token, then decodes one more
    execute(plan, s)
    assert [len(x.generated) for x in (a, b, c)] == [2, 2, 2]


def test_padding_counts_against_the_budget() -> None:
    s = sched(budget=16)
    a, b = seq("a", 3), seq("b", 10)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    # Together they would cost 2 x 10 > 16: "a" alone is no group, so both take chunks.
    assert plan.group == () and chunks(plan) == [("a", 0, 3), ("b", 0, 10)]


def test_a_long_prompt_prefills_in_budget_sized_chunks() -> None:
    s = sched(budget=8)
    a = seq("a", 20)
    s.add(a)
    seen = []
    for _ in range(3):
        plan, _ = step(s)
        seen += chunks(plan)
        assert plan.decode == ((a,) if a.prefilled == 20 else ())
    assert seen == [("a", 0, 8), ("a", 8, 8), ("a", 16, 4)]
    assert a.phase is Phase.DECODE and len(a.generated) == 2  # first token + one decode


def test_the_budget_is_shared_in_slot_order_and_a_request_may_cap_its_chunks() -> None:
    s = sched(budget=10)
    a, b = seq("a", 7, prefill_step_size=3), seq("b", 12)
    s.add(a)
    s.add(b)
    plan, _ = step(s)
    assert plan.group == ()  # a request with its own chunk size never joins a group
    assert chunks(plan) == [("a", 0, 3), ("b", 0, 7)]
    plan, _ = step(s)
    assert chunks(plan) == [("a", 3, 3), ("b", 7, 5)]


def test_queue_limit_counts_only_requests_that_will_wait() -> None:
    s = sched(max_batch=2, max_queue=1)
    s.add(seq("a"))
    s.add(seq("b"))  # a free slot takes it at the next step
    c = seq("c")
    s.add(c)  # waits
    with pytest.raises(RequestRejected) as exc:
        s.add(seq("d"))
    assert exc.value.code == "busy"
    assert s.cancel(c.key)
    s.add(seq("d"))  # a cancelled waiter gives its place back at once
    assert s.load().waiting == 4  # all queued until the next step
    plan, _ = step(s)
    assert names(plan.ended) == ["c"] and names(plan.admitted) == ["a", "b"]
    assert names(tuple(s.waiting)) == ["d"]


def test_cancelling_a_waiting_request_ends_it_without_a_slot() -> None:
    s = sched(max_batch=1)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    step(s)
    assert s.cancel(b.key) and s.cancel(b.key)  # idempotent while it lives
    plan, _ = step(s)
    assert plan.ended == (b,) and b.finish_reason == "cancelled" and b.slot is None
    assert b.phase is Phase.FINISHED and s.get(b.key) is None
    assert not s.cancel(b.key)  # ended: a no-op
    assert list(s.waiting) == [c]  # order kept


def test_cancelling_mid_prefill_frees_the_slot_without_more_work() -> None:
    s = sched(budget=8)
    a = seq("a", 30)
    s.add(a)
    step(s)
    assert a.phase is Phase.PREFILL and a.prefilled == 8
    s.cancel(a.key)
    plan, done = step(s)
    assert plan.chunks == () and plan.decode == ()
    assert done.finished == (a,) and done.releases == (Release(a, 0, None),)
    assert a.finish_reason == "cancelled" and a.generated == [] and not s.has_work()


def test_cancelling_a_decoding_request_keeps_the_others_decoding() -> None:
    s = sched()
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        s.add(x)
    step(s)
    s.cancel(a.key)
    plan, done = step(s)
    assert plan.decode == (b, c) and done.finished == (a,)
    assert done.releases == (Release(a, 0, 2),) and (c.slot, b.slot) == (0, 1)
    assert a.finish_reason == "cancelled" and len(a.generated) == 2
    assert [len(x.generated) for x in (b, c)] == [3, 3]


def test_a_cancel_that_races_the_last_token_ends_the_request_once() -> None:
    s = sched()
    a = seq("a", max_tokens=1)
    s.add(a)
    plan = s.schedule()
    assert s.cancel(a.key)  # arrives while the step is planned (its token in flight)
    done = execute(plan, s)
    # The token that was in flight still lands; the request ends "length", not twice.
    assert a.finish_reason == "length" and done.finished == (a,)
    assert not s.cancel(a.key)


def test_a_long_prefill_never_stops_running_decodes() -> None:
    s = sched(budget=512)
    runners = [seq(f"r{i}") for i in range(3)]
    for x in runners:
        s.add(x)
    step(s)
    long = seq("long", 2000)
    s.add(long)
    steps = 0
    while long.phase is not Phase.DECODE:
        before = [len(x.generated) for x in runners]
        plan, _ = step(s)
        steps += 1
        assert set(runners) <= set(plan.decode)
        assert [len(x.generated) for x in runners] == [n + 1 for n in before]
        assert sum(c.size for c in plan.chunks) <= 512
    assert steps == 4  # 2,000 prompt tokens at 512 per step


def test_abort_all_drops_everything() -> None:
    s = sched(max_batch=1)
    a, b = seq("a"), seq("b")
    s.add(a)
    s.add(b)
    s.schedule()
    assert sorted(s.abort_all()) == [a.key, b.key]
    assert not s.has_work() and s.get(a.key) is None
    assert a.phase is b.phase is Phase.FINISHED and a.slot is None


def test_a_plan_is_immutable() -> None:
    s = sched()
    s.add(seq("a"))
    plan = s.schedule()
    with pytest.raises(AttributeError):
        plan.decode = ()  # type: ignore[misc]
    assert isinstance(plan.chunks, tuple) and all(isinstance(c, PrefillChunk) for c in plan.chunks)
