"""The prefix cache's tree and the scheduler's hit planning, with no model.

Segments here are plain lists of the token ids they stand for (what a KV
segment holds is a function of those tokens), so every hit can be checked by
concatenating its parts: they must spell the prompt's first `length` tokens.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from test_scheduler import chunks, names, sched, seq, step

import ffai_worker  # noqa: F401 - BLAS first
from ffai_worker.engine.prefix_cache import PrefixCache, PrefixHit
from ffai_worker.engine.sequence import Phase

BPT = 10  # bytes per token


class Run:
    """A segment that remembers which tokens it holds."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def split(self, at: int) -> tuple[Run, Run]:
        return Run(self.tokens[:at]), Run(self.tokens[at:])


def cache(tokens: int = 1000, min_hit: int = 1) -> PrefixCache:
    return PrefixCache(tokens * BPT, BPT, min_hit=min_hit)


def add(c: PrefixCache, tokens: list[int]) -> int:
    return c.insert(tokens, lambda a, b: Run(tokens[a:b]))


def spelled(hit: PrefixHit | None) -> list[int]:
    assert hit is not None
    out: list[int] = []
    for seg, used in hit.parts:
        assert isinstance(seg, Run) and 0 < used <= len(seg.tokens)
        out += seg.tokens[:used]
    assert len(out) == hit.length
    return out


def test_the_prefix_cache_needs_no_mlx() -> None:
    code = "import sys, ffai_worker.engine.prefix_cache; sys.exit('mlx.core' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_hit_is_the_whole_longest_common_prefix_at_token_granularity() -> None:
    c = cache()
    a = list(range(1, 41))
    assert add(c, a) == 40
    prompt = [*a[:23], 99, 98]  # diverges mid-run
    hit = c.match(prompt, len(prompt) - 1)
    assert spelled(hit) == a[:23]
    # The limit keeps the last prompt token to prefill, even when all of it is cached.
    assert spelled(c.match(a, len(a) - 1)) == a[:39]
    assert c.match([7, 1, 2], 2) is None
    assert c.counters.hits == 2 and c.counters.misses == 1 and c.counters.hit_tokens == 62


def test_shared_prefixes_are_stored_once_and_hits_span_split_runs() -> None:
    c = cache()
    system = list(range(100, 130))
    first, second = [*system, 1, 2, 3, 4], [*system, 5, 6, 7]
    add(c, first)
    assert add(c, second) == 3  # only the new tail is taken
    assert c.bytes == (30 + 4 + 3) * BPT and c.entries == 3  # system, two tails
    assert spelled(c.match([*second, 8], 10**6)) == second
    assert spelled(c.match([*first, 9], 10**6)) == first
    # A reply extends its prompt: one more run below it (multi-turn chat).
    reply = [*second, 11, 12, 13]
    assert add(c, reply) == 3
    assert spelled(c.match([*reply, 14, 15], 10**6)) == reply
    assert add(c, reply) == 0 and add(c, system[:5]) == 0  # nothing new


def test_lru_by_bytes_a_hit_refreshes_and_the_bound_always_holds() -> None:
    c = cache(tokens=100)
    a, b, d = [1] * 40, [2] * 40, [3] * 40
    add(c, a)
    add(c, b)
    assert c.match([*a, 5], 10**6) is not None  # a is now the most recent
    add(c, d)  # needs room: b (least recent) goes, not a
    assert c.match([*b, 5], 10**6) is None
    assert spelled(c.match([*a, 5], 10**6)) == a and c.counters.evictions == 1
    assert c.bytes <= c.capacity_bytes
    for i in range(200):  # a flood of distinct prompts
        add(c, [1000 + i] * (7 + i % 30))
        assert c.bytes <= c.capacity_bytes
    assert add(c, list(range(5000, 5300))) == 100  # bigger than the cache: cut to fit
    assert c.bytes == c.capacity_bytes and c.entries == 1


def test_eviction_takes_leaves_before_the_prefixes_they_extend() -> None:
    c = cache(tokens=60)
    system = [9] * 30
    add(c, system + [1] * 10)
    add(c, system + [2] * 10)
    add(c, [4] * 15)  # 65 tokens wanted: the oldest leaf goes, the shared prefix stays
    assert c.match([*system, 1], 10**6) is not None and c.match([*system, 1], 10**6).length == 30
    assert spelled(c.match(system + [2] * 10 + [0], 10**6)) == system + [2] * 10


def test_an_insert_never_evicts_the_prefix_it_extends() -> None:
    c = cache(tokens=50)
    add(c, [1] * 40)
    assert add(c, [1] * 40 + [2] * 20) == 10  # only room for 10 more; the 40 stay
    assert spelled(c.match([1] * 40 + [2] * 30, 10**6)) == [1] * 40 + [2] * 10


def test_hits_shorter_than_the_minimum_are_misses() -> None:
    c = cache(min_hit=16)
    add(c, list(range(40)))
    assert c.match([*range(15), 99], 10**6) is None
    assert spelled(c.match([*range(16), 99], 10**6)) == list(range(16))
    assert (c.counters.hits, c.counters.misses) == (1, 1)


def test_off_means_no_lookups_and_no_inserts() -> None:
    c = PrefixCache(0, BPT)
    assert not c.enabled and add(c, [1, 2, 3]) == 0 and c.match([1, 2, 3], 2) is None
    assert c.counters.misses == 0


def test_export_and_restore_keep_the_tree_its_recency_and_the_bound() -> None:
    c = cache()
    add(c, [1, 2, 3, 4])
    add(c, [1, 2, 5])
    add(c, [7] * 20)
    assert c.match([1, 2, 3, 4, 0], 10**6) is not None  # the most recent now
    saved = c.export()
    assert [p for p, _, _ in saved] == [-1, 0, -1, 0]  # parents first
    again = cache()
    assert again.restore(saved) == 25 and again.bytes == c.bytes
    assert spelled(again.match([1, 2, 5, 0], 10**6)) == [1, 2, 5]
    assert spelled(again.match([7] * 21, 10**6)) == [7] * 20
    small = cache(tokens=5)  # the 20 sevens do not fit: what does fit comes back
    assert small.restore(saved) == 5
    assert spelled(small.match([1, 2, 3, 4, 0], 10**6)) == [1, 2, 3, 4]
    assert small.match([7] * 21, 10**6) is None
    assert spelled(small.match([1, 2, 5, 0], 10**6)) == [1, 2, 5]
    bad = cache()
    assert bad.restore([(5, (1, 2), Run([1, 2])), (-1, (3,), Run([3]))]) == 1  # orphan dropped


# -- the scheduler plans hits ---------------------------------------------------
def prompt_of(s: Any) -> list[int]:
    return list(s.prompt_ids)


def test_the_scheduler_plans_a_hit_and_prefills_only_the_rest() -> None:
    c = cache()
    s = sched(budget=8)
    s.prefix = c
    a = seq("a", 20)
    add(c, prompt_of(a)[:13])
    s.add(a)
    plan, _ = step(s)
    assert names(plan.admitted) == ["a"] and a.cached == 13 and a.prefix_hit is not None
    assert plan.group == () and chunks(plan) == [("a", 13, 7)]  # not from position 0
    assert a.phase is Phase.DECODE


def test_a_fully_cached_prompt_still_prefills_its_last_token() -> None:
    c = cache()
    s = sched()
    s.prefix = c
    a, b = seq("a", 12), seq("b", 12)
    add(c, [*prompt_of(a), 5, 6])
    s.add(a)
    s.add(b)
    plan, _ = step(s)
    assert (a.cached, b.cached) == (11, 11)
    assert plan.group == () and chunks(plan) == [("a", 11, 1), ("b", 11, 1)]


def test_warm_requests_prefill_alone_and_never_decode() -> None:
    from test_scheduler import TOKENIZER, params

    from ffai_worker.engine.sequence import EngineRequest, new_sequence
    from ffai_worker.engine.types import RequestKey

    s = sched(budget=64)
    w = new_sequence(
        EngineRequest(RequestKey(b"c", "w"), [1, 5, 6, 7], params(), warm=True),
        TOKENIZER,
        default_temperature=0.0,
    )
    a, b = seq("a", 4), seq("b", 4)
    for x in (a, w, b):
        s.add(x)
    plan = s.schedule()
    assert names(plan.group) == ["a", "b"] and chunks(plan) == [("w", 0, 4)]
    assert w not in plan.decode
