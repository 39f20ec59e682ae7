"""Continuous batching: batch invariance, chunked prefill that never freezes streams, the queue."""

from __future__ import annotations

import shutil
from collections.abc import Hashable
from pathlib import Path

import checkpoints
import pytest
from conftest import TINYSTORIES, TOKENIZERS

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.sequence import RequestRejected

GREEDY = GenerationParameters(temperature=0.0, max_tokens=48, stop_on_eos=False)


def build_qwen2(folder: Path) -> Path:
    """A tiny random Qwen2 (qkv biases) with the real Qwen2.5 tokenizer and a long context.

    checkpoints.py draws weights at 0.1 with random norms and biases: at transformers'
    default init a greedy row just repeats one token, which would hide per-row KV,
    rope-offset or mask bugs.
    """
    checkpoints.build_qwen2(
        folder, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "qwen2.5" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny() -> Engine:
    return Engine.load(TINYSTORIES, config=EngineConfig(max_batch=8, max_queue=16))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = build_qwen2(tmp_path_factory.mktemp("qwen2"))
    return Engine.load(
        folder, config=EngineConfig(max_batch=8, max_queue=16, prefill_step_size=512)
    )


def run_all(
    engine: Engine, requests: dict[Hashable, dict], stagger: int = 0
) -> dict[Hashable, list[int]]:
    """Submit requests (every `stagger` steps, or all at once) and step until all finish."""
    pending = list(requests.items())
    seqs = {}
    tokens: dict[Hashable, list[int]] = {k: [] for k in requests}
    steps = 0
    while pending or engine.has_work():
        if pending and (stagger == 0 or steps % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for key, kwargs in batch:
                seqs[key] = engine.submit(engine.new_request(key, **kwargs))
            pending = [] if stagger == 0 else pending[1:]
        engine.step()
        steps += 1
        for key, seq in seqs.items():
            while seq.outbox:
                tokens[key].extend(seq.outbox.popleft().tokens)
    return tokens


def prompts_of_different_lengths(engine: Engine) -> dict[Hashable, dict]:
    base = "Once upon a time there was a little dog who liked to play in the park with friends"
    words = base.split()
    return {
        f"r{i}": {"prompt": " ".join(words[: 2 + 2 * i]), "parameters": GREEDY} for i in range(8)
    }


@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("stagger", [0, 3])
def test_batched_greedy_equals_solo(
    request: pytest.FixtureRequest, which: str, stagger: int
) -> None:
    engine: Engine = request.getfixturevalue(which)
    requests = prompts_of_different_lengths(engine)
    solo = {k: engine.generate(**kw).generated_tokens for k, kw in requests.items()}
    assert all(len(set(t)) > 10 for t in solo.values())  # rows that differ, so mixups show
    together = run_all(engine, requests, stagger=stagger)
    assert together == solo
    assert engine.cache.allocated_bytes == 0


def test_seeded_sampling_is_batch_invariant(tiny: Engine) -> None:
    requests = {
        f"s{i}": {
            "prompt": "The cat" + " and the dog" * i,
            "parameters": GenerationParameters(
                temperature=1.0, top_k=40, seed=100 + i, max_tokens=32
            ),
        }
        for i in range(6)
    }
    solo = {k: tiny.generate(**kw).generated_tokens for k, kw in requests.items()}
    assert run_all(tiny, requests) == solo


def test_long_prompt_prefill_does_not_freeze_running_streams(qwen: Engine) -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=200, stop_on_eos=False)
    streams = [
        qwen.submit(qwen.new_request(f"run{i}", prompt=f"stream {i}", parameters=params))
        for i in range(4)
    ]
    while any(not s.generated for s in streams):
        qwen.step()
    long_ids = [(i * 7919) % 150000 + 10 for i in range(2000)]
    long = qwen.submit(qwen.new_request("long", tokens=long_ids, parameters=params))
    prefill_steps = 0
    while not long.generated:
        before = [len(s.generated) for s in streams]
        qwen.step()
        prefill_steps += 1
        after = [len(s.generated) for s in streams]
        assert after == [b + 1 for b in before]  # every stream got a token in this step
    assert prefill_steps >= 4  # 2,000 tokens at 512 per step: spread over steps
    for key in ["long", *(f"run{i}" for i in range(4))]:
        qwen.cancel(key)
    while qwen.has_work():
        qwen.step()


def test_queue_overflow_is_busy_and_cancelling_a_queued_request_frees_its_slot() -> None:
    engine = Engine.load(TINYSTORIES, config=EngineConfig(max_batch=1, max_queue=2))
    params = GenerationParameters(temperature=0.0, max_tokens=50, stop_on_eos=False)
    running = engine.submit(engine.new_request("a", prompt="Once", parameters=params))
    engine.step()  # "a" takes the only slot
    queued = [
        engine.submit(engine.new_request(k, prompt="The cat", parameters=params)) for k in "bc"
    ]
    with pytest.raises(RequestRejected) as exc:
        engine.submit(engine.new_request("d", prompt="The dog", parameters=params))
    assert exc.value.code == "busy"
    assert engine.cancel("b")
    engine.step()
    final = queued[0].outbox[-1]
    assert final.is_final and final.finish_reason == "cancelled" and final.tokens == []
    engine.submit(engine.new_request("d", prompt="The dog", parameters=params))  # room again
    assert not engine.cancel("nope")  # unknown id: harmless
    for key in "acd":
        engine.cancel(key)
    while engine.has_work():
        engine.step()
    assert running.finish_reason == "cancelled"
    assert engine.cache.allocated_bytes == 0


def test_busy_counts_only_requests_that_will_wait() -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=50, stop_on_eos=False)
    # Free slots take new requests at the next step: they never count as queued.
    engine = Engine.load(TINYSTORIES, config=EngineConfig(max_batch=3, max_queue=0))
    for key in "abc":
        engine.submit(engine.new_request(key, prompt="Once", parameters=params))
    with pytest.raises(RequestRejected) as exc:
        engine.submit(engine.new_request("d", prompt="Once", parameters=params))
    assert exc.value.code == "busy"
    # A cancelled waiter gives its place back at once, before any step removes it.
    engine = Engine.load(TINYSTORIES, config=EngineConfig(max_batch=1, max_queue=1))
    engine.submit(engine.new_request("a", prompt="Once", parameters=params))
    engine.step()
    engine.submit(engine.new_request("b", prompt="The cat", parameters=params))
    with pytest.raises(RequestRejected):
        engine.submit(engine.new_request("c", prompt="The dog", parameters=params))
    assert engine.cancel("b")
    late = engine.submit(engine.new_request("c", prompt="The dog", parameters=params))
    engine.cancel("a")
    while engine.has_work():
        engine.step()
    assert late.finish_reason == "length" and len(late.generated) == 50
