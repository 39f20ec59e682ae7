"""Continuous batching: batch invariance, chunked prefill that never freezes streams, the queue."""

from __future__ import annotations

import shutil
from pathlib import Path

import checkpoints
import pytest
from conftest import TINYSTORIES, TOKENIZERS

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.engine.sequence import RequestRejected
from ffai_worker.engine.types import RequestKey, StepOutput

GREEDY = GenerationParameters(temperature=0.0, max_tokens=48, stop_on_eos=False)


def key(name: str) -> RequestKey:
    return RequestKey(b"test", name)


def submit(engine: Engine, name: str, **kwargs: object) -> None:
    engine.submit(engine.new_request(key(name), **kwargs))  # type: ignore[arg-type]


def step(engine: Engine) -> dict[str, StepOutput]:
    """One step; its outputs by request name."""
    return {out.key.request_id: out for out in engine.step()}


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


def run_all(engine: Engine, requests: dict[str, dict], stagger: int = 0) -> dict[str, list[int]]:
    """Submit requests (every `stagger` steps, or all at once) and step until all finish."""
    pending = list(requests.items())
    tokens: dict[str, list[int]] = {k: [] for k in requests}
    steps = 0
    while pending or engine.has_work():
        if pending and (stagger == 0 or steps % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for name, kwargs in batch:
                submit(engine, name, **kwargs)
            pending = [] if stagger == 0 else pending[1:]
        for name, out in step(engine).items():
            for chunk in out.chunks:
                tokens[name].extend(chunk.tokens)
        steps += 1
    return tokens


def prompts_of_different_lengths(engine: Engine) -> dict[str, dict]:
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
    streams = [f"run{i}" for i in range(4)]
    for i, name in enumerate(streams):
        submit(qwen, name, prompt=f"stream {i}", parameters=params)
    started: set[str] = set()
    while started != set(streams):
        started |= {name for name, out in step(qwen).items() if any(c.tokens for c in out.chunks)}
    long_ids = [(i * 7919) % 150000 + 10 for i in range(2000)]
    submit(qwen, "long", tokens=long_ids, parameters=params)
    prefill_steps = 0
    while True:
        outputs = step(qwen)
        prefill_steps += 1
        for name in streams:  # every stream got a token in this step
            assert sum(len(c.tokens) for c in outputs[name].chunks) == 1, (name, prefill_steps)
        if "long" in outputs:
            break
    assert prefill_steps >= 4  # 2,000 tokens at 512 per step: spread over steps
    for name in ["long", *streams]:
        qwen.cancel(key(name))
    while qwen.has_work():
        qwen.step()


def test_queue_overflow_is_busy_and_cancelling_a_queued_request_frees_its_slot() -> None:
    engine = Engine.load(TINYSTORIES, config=EngineConfig(max_batch=1, max_queue=2))
    params = GenerationParameters(temperature=0.0, max_tokens=50, stop_on_eos=False)
    submit(engine, "a", prompt="Once", parameters=params)
    step(engine)  # "a" takes the only slot
    for name in "bc":
        submit(engine, name, prompt="The cat", parameters=params)
    with pytest.raises(RequestRejected) as exc:
        submit(engine, "d", prompt="The dog", parameters=params)
    assert exc.value.code == "busy"
    assert engine.cancel(key("b"))
    cancelled = step(engine)["b"]
    final = cancelled.chunks[-1]
    assert cancelled.finished and len(cancelled.chunks) == 1
    assert final.is_final and final.finish_reason == "cancelled" and final.tokens == []
    submit(engine, "d", prompt="The dog", parameters=params)  # room again
    assert not engine.cancel(key("nope"))  # unknown id: harmless
    for name in "acd":
        engine.cancel(key(name))
    finals = {}
    while engine.has_work():
        finals |= {name: out.chunks[-1] for name, out in step(engine).items() if out.finished}
    assert {name: c.finish_reason for name, c in finals.items()} == dict.fromkeys(
        "acd", "cancelled"
    )
    assert engine.cache.allocated_bytes == 0


def test_busy_counts_only_requests_that_will_wait() -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=50, stop_on_eos=False)
    # Free slots take new requests at the next step: they never count as queued.
    engine = Engine.load(TINYSTORIES, config=EngineConfig(max_batch=3, max_queue=0))
    for name in "abc":
        submit(engine, name, prompt="Once", parameters=params)
    with pytest.raises(RequestRejected) as exc:
        submit(engine, "d", prompt="Once", parameters=params)
    assert exc.value.code == "busy"
    # A cancelled waiter gives its place back at once, before any step removes it.
    engine = Engine.load(TINYSTORIES, config=EngineConfig(max_batch=1, max_queue=1))
    submit(engine, "a", prompt="Once", parameters=params)
    engine.step()
    submit(engine, "b", prompt="The cat", parameters=params)
    with pytest.raises(RequestRejected):
        submit(engine, "c", prompt="The dog", parameters=params)
    assert engine.cancel(key("b"))
    submit(engine, "c", prompt="The dog", parameters=params)
    engine.cancel(key("a"))
    late: list[int] = []
    finish = None
    while engine.has_work():
        out = step(engine).get("c")
        for chunk in out.chunks if out else ():
            late.extend(chunk.tokens)
            finish = chunk.finish_reason or finish
    assert finish == "length" and len(late) == 50
