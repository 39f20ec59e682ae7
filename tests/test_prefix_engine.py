"""The prefix cache in the engine: hits give the same greedy tokens as a fresh worker.

Invariant 8. The oracle is an engine with the cache off (tinystories, itself
checked against transformers in test_engine.py) and transformers' own greedy
continuation for the random checkpoints of every architecture, sliding windows
included (the hit's KV is copied whole; windows are applied by masks).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import checkpoints
import pytest
from conftest import TINYSTORIES
from test_engine_parity import ARCHS, VOCAB, run_batch

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.engine.types import RequestKey

N = 40
GREEDY = GenerationParameters(temperature=0.0, max_tokens=N, stop_on_eos=False)
STORY = (
    "Once upon a time there was a little dog named Max who liked to play in the big green park"
    " with his friends Lily and Ben every sunny day"
)


def chunked(size: int) -> GenerationParameters:
    return GenerationParameters(
        temperature=0.0, max_tokens=N, stop_on_eos=False, prefill_step_size=size
    )


@pytest.fixture(scope="module")
def cold() -> Engine:
    """The fresh worker: no prefix cache at all."""
    return Engine.load(TINYSTORIES, config=EngineConfig(prompt_cache_bytes=0))


@pytest.fixture
def engine() -> Engine:
    return Engine.load(TINYSTORIES, config=EngineConfig(max_batch=8, max_queue=16))


def test_hits_on_prompts_replies_and_mid_run_give_the_cold_tokens(
    engine: Engine, cold: Engine
) -> None:
    first = engine.generate(STORY, parameters=GREEDY)
    assert first.stats.cached_prompt_tokens == 0
    assert first.generated_tokens == cold.generate(STORY, parameters=GREEDY).generated_tokens
    story = engine.tokenize(STORY)
    cases = {
        # The chat pattern: the prompt and its reply, then a new message.
        "reply": story + first.generated_tokens + engine.tokenize(" The end.", False),
        "same": story,  # all but its last token from the cache
        "mid": story[:19] + engine.tokenize(" cat who was sad", False),  # ends inside a run
        "reply-mid": story + first.generated_tokens[:13] + [engine.tokenize(" sun", False)[0]],
    }
    expect_cached = {
        "reply": len(story) + N,
        "same": len(story) - 1,
        "mid": 19,
        "reply-mid": len(story) + 13,
    }
    for name, ids in cases.items():
        hot = engine.generate(tokens=ids, parameters=GREEDY)
        assert hot.stats.cached_prompt_tokens == expect_cached[name], name
        assert hot.stats.prompt_tokens == len(ids)
        assert hot.generated_tokens == cold.generate(tokens=ids, parameters=GREEDY).generated_tokens
    info = engine.info()
    assert info["prompt_cache_hits"] == 4 and info["prompt_cache_misses"] == 1
    assert info["prompt_cache_hit_tokens"] == sum(expect_cached.values())
    assert 0 < info["prompt_cache_bytes"] <= info["prompt_cache_capacity_bytes"]
    assert info["prompt_cache_entries"] >= 3 and info["prompt_cache_evictions"] == 0


def test_a_ten_turn_chat_hits_everything_up_to_the_new_message(
    engine: Engine, cold: Engine
) -> None:
    ids = engine.tokenize("Lily had a red ball.")
    previous = 0
    for turn in range(10):
        hot = engine.generate(tokens=ids, parameters=chunked(7) if turn % 2 else GREEDY)
        assert hot.generated_tokens == cold.generate(tokens=ids, parameters=GREEDY).generated_tokens
        assert hot.stats.cached_prompt_tokens == previous, turn
        previous = len(ids) + N  # the prompt and the whole reply are cached
        ids = ids + hot.generated_tokens + engine.tokenize(f" Then {turn} birds came.", False)
        if len(ids) + N >= engine.context_length:
            break


def test_hits_while_other_sequences_are_batched(engine: Engine, cold: Engine) -> None:
    base = engine.tokenize(STORY)
    engine.generate(tokens=base, parameters=GREEDY)
    prompts = {
        f"p{i}": base[: 16 + 3 * i] + engine.tokenize(f" and {i} frogs", False) for i in range(5)
    }
    prompts["fresh"] = engine.tokenize("The cat sat on the mat.")
    requests: dict[str, dict[str, Any]] = {
        name: {"tokens": ids, "parameters": chunked(4) if name == "p3" else GREEDY}
        for name, ids in prompts.items()
    }
    for stagger in (0, 2):
        got = run_batch(engine, requests, stagger=stagger)
        for name, ids in prompts.items():
            want = cold.generate(tokens=ids, parameters=GREEDY).generated_tokens
            assert got[name] == want, (stagger, name)
    assert engine.prefix.counters.hits >= 10


def test_concurrent_requests_share_a_running_prompt(engine: Engine) -> None:
    """A running request's prompt is cached once prefilled, before it finishes."""
    system = engine.tokenize(STORY)
    long = GenerationParameters(temperature=0.0, max_tokens=200, stop_on_eos=False)
    engine.submit(engine.new_request(RequestKey(b"t", "a"), tokens=system, parameters=long))
    engine.step()
    key = RequestKey(b"t", "b")
    engine.submit(engine.new_request(key, tokens=[*system, 300, 301], parameters=GREEDY))
    engine.step()
    assert engine.scheduler.get(key).cached == len(system)  # type: ignore[union-attr]
    engine.cancel(RequestKey(b"t", "a"))
    engine.cancel(key)
    while engine.has_work():
        engine.step()


def test_warm_up_prefills_only_and_leaves_the_prompt_cached(engine: Engine, cold: Engine) -> None:
    warm = list(engine.generate_stream(STORY, parameters=GREEDY, warm=True))
    assert len(warm) == 1 and warm[0].is_final and warm[0].tokens == [] and warm[0].text == ""
    stats = warm[0].stats
    assert stats is not None and warm[0].finish_reason == "length"
    assert stats.generated_tokens == 0 and stats.prompt_tokens == len(engine.tokenize(STORY))
    assert stats.prefill_time_s > 0 and stats.time_to_first_token_ms > 0
    assert engine.cache.allocated_bytes == 0  # the slot is free; the KV is in the cache
    follow = STORY + " and one day"
    hot = engine.generate(follow, parameters=GREEDY)
    assert hot.stats.cached_prompt_tokens == stats.prompt_tokens
    assert hot.generated_tokens == cold.generate(follow, parameters=GREEDY).generated_tokens


def test_cancel_during_prefill_stops_at_a_chunk_boundary_and_keeps_what_ran(
    engine: Engine, cold: Engine
) -> None:
    ids = engine.tokenize(" ".join([STORY] * 4))[:300]
    key = RequestKey(b"t", "long")
    engine.submit(engine.new_request(key, tokens=ids, parameters=chunked(16)))
    engine.step()
    engine.step()  # two chunks of 16 prefilled
    assert engine.cancel(key)
    (out,) = engine.step()
    assert out.finished and out.chunks[-1].finish_reason == "cancelled"
    assert out.chunks[-1].stats.generated_tokens == 0  # type: ignore[union-attr]
    assert not engine.has_work()
    hot = engine.generate(tokens=ids[:40], parameters=GREEDY)
    assert hot.stats.cached_prompt_tokens == 32
    assert (
        hot.generated_tokens == cold.generate(tokens=ids[:40], parameters=GREEDY).generated_tokens
    )


def test_a_flood_of_distinct_prompts_never_exceeds_the_bound() -> None:
    import mlx.core as mx

    probe = Engine.load(TINYSTORIES, config=EngineConfig(prompt_cache_bytes=0))
    bound = 150 * probe.cache.bytes_per_token  # room for about three prompts and replies
    engine = Engine.load(TINYSTORIES, config=EngineConfig(prompt_cache_bytes=bound))
    engine.generate("Hello", parameters=GREEDY)  # compile and warm up before measuring
    engine.prefix.clear()
    baseline = mx.get_active_memory()
    words = "cat dog sun tree boat fish bird cake hat ball".split()
    for i in range(40):
        prompt = f"The {words[i % 10]} and the {words[i // 10]} went to see {i} friends"
        engine.generate(prompt, parameters=GREEDY)
        assert engine.prefix.bytes <= bound
        assert mx.get_active_memory() - baseline <= bound + 64 * 1024  # the cache's own bytes
    info = engine.info()
    assert info["prompt_cache_evictions"] > 20  # prompts share a few tokens: each needs room
    assert info["prompt_cache_hits"] + info["prompt_cache_misses"] == 41  # with "Hello"


def test_eviction_never_touches_what_a_running_sequence_uses(cold: Engine) -> None:
    """A tight bound: other requests' KV evicts the run a decoding request was served from."""
    probe = Engine.load(TINYSTORIES, config=EngineConfig(prompt_cache_bytes=0))
    engine = Engine.load(
        TINYSTORIES, config=EngineConfig(prompt_cache_bytes=80 * probe.cache.bytes_per_token)
    )
    story = engine.tokenize(STORY)
    engine.generate(tokens=story, parameters=GREEDY)
    hot = [*story, *engine.tokenize(" and the cat", False)]
    others = {f"o{i}": engine.tokenize(f"{i} frogs sat on a log by the pond") for i in range(6)}
    requests: dict[str, dict[str, Any]] = {"hot": {"tokens": hot, "parameters": GREEDY}}
    requests |= {name: {"tokens": ids, "parameters": GREEDY} for name, ids in others.items()}
    evictions = engine.prefix.counters.evictions
    got = run_batch(engine, requests, stagger=2)  # "hot" first; the others arrive as it decodes
    assert engine.prefix.counters.evictions > evictions and engine.prefix.counters.hits >= 1
    for name, kwargs in requests.items():
        assert got[name] == cold.generate(**kwargs).generated_tokens, name


def test_scored_prompts_are_never_served_from_the_cache(engine: Engine) -> None:
    """prompt_logprobs needs every position's logits: a cached prefix has none."""
    engine.generate(STORY, parameters=GREEDY)
    scored = GenerationParameters(
        temperature=0.0, max_tokens=4, stop_on_eos=False, prompt_logprobs=True
    )
    result = engine.generate(STORY + " and a cat", parameters=scored)
    assert result.stats.cached_prompt_tokens == 0
    assert result.prompt_logprobs is not None
    assert len(result.prompt_logprobs) == result.stats.prompt_tokens - 1
    # Its own prompt is cached all the same, for the requests after it.
    again = engine.generate(STORY + " and a cat", parameters=GREEDY)
    assert again.stats.cached_prompt_tokens == result.stats.prompt_tokens - 1


def test_off_means_no_hits_and_zero_cached_tokens(cold: Engine) -> None:
    cold.generate(STORY, parameters=GREEDY)
    again = cold.generate(STORY, parameters=GREEDY)
    assert again.stats.cached_prompt_tokens == 0
    info = cold.info()
    assert info["prompt_cache_bytes"] == 0 and info["prompt_cache_hits"] == 0


# -- every architecture against transformers ------------------------------------
@pytest.mark.parametrize("name", list(ARCHS))
def test_hits_match_transformers_on_every_architecture(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch

    build, seed = ARCHS[name]
    folder = _checkpoint(build, seed, tmp_path_factory.mktemp(name))
    engine = Engine.load(folder, config=EngineConfig(max_batch=4, max_queue=8))
    reference = checkpoints.load_reference(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        story = engine.tokenize(STORY)  # 31 tokens: past the 12-position windows
        first = engine.generate(tokens=story, parameters=GREEDY).generated_tokens
        assert first == checkpoints.greedy_reference(reference, story, N)
        prompts = {
            "reply": story + first + [300, 301, 302],
            "mid": [*story[:17], 400, 401, 402, 403],
            "reply-mid": story + first[:7] + [402],
            "chunked": story + first + [310],
        }
        requests = {
            k: {"tokens": v, "parameters": chunked(3) if k == "chunked" else GREEDY}
            for k, v in prompts.items()
        }
        got = run_batch(engine, requests)  # hits prefilled while the others decode
        for k, ids in prompts.items():
            assert got[k] == checkpoints.greedy_reference(reference, ids, N), (name, k)
        assert engine.prefix.counters.hits == 4
    finally:
        torch.set_num_threads(threads)


def _checkpoint(build: Callable[..., Path], seed: int, folder: Path) -> Path:
    build(folder, vocab_size=VOCAB, seed=seed)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINYSTORIES / file, folder / file)
    return folder
