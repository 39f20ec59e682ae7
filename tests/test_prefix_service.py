"""The prefix cache through a real worker: start-up line, stats, `info`, warm-up, the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import Client
from ffai_client.types import GenerationParameters

GREEDY = GenerationParameters(temperature=0.0, max_tokens=30, stop_on_eos=False)
PROMPT = "Once upon a time there was a little dog named Max who liked to play in the park"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    w = WorkerProcess(TINYSTORIES, "--prompt-cache-bytes", "1MiB")
    yield w
    w.stop()


def test_the_bound_is_printed_at_start_up(worker: WorkerProcess) -> None:
    assert "prompt cache up to 1 MiB of KV" in worker.log()


def test_a_repeated_prompt_is_served_from_the_cache(worker: WorkerProcess) -> None:
    with Client(worker.endpoint) as client:
        before = client.info()
        cold = client.generate(PROMPT, parameters=GREEDY)
        hot = client.generate(PROMPT + cold.text + " The end.", parameters=GREEDY)
        again = client.generate(PROMPT, parameters=GREEDY)
        info = client.info()
    assert cold.stats.cached_prompt_tokens == 0
    assert hot.stats.cached_prompt_tokens == cold.stats.prompt_tokens + 30
    assert again.stats.cached_prompt_tokens == cold.stats.prompt_tokens - 1
    assert again.generated_tokens == cold.generated_tokens
    assert info.prompt_cache_capacity_bytes == 1 << 20
    assert 0 < info.prompt_cache_bytes <= 1 << 20  # type: ignore[operator]
    assert info.prompt_cache_entries is not None and info.prompt_cache_entries >= 1
    assert before.prompt_cache_hits is not None and info.prompt_cache_hits is not None
    assert info.prompt_cache_hits - before.prompt_cache_hits == 2
    assert info.prompt_cache_hit_tokens == (before.prompt_cache_hit_tokens or 0) + (
        hot.stats.cached_prompt_tokens + again.stats.cached_prompt_tokens
    )
    assert info.prompt_cache_misses is not None and info.prompt_cache_evictions == 0


def test_warm_up_over_the_wire(worker: WorkerProcess) -> None:
    context = "Lily found a shiny red stone near the river and took it home to show her mom"
    with Client(worker.endpoint) as client:
        chunks = list(client.generate_stream(context, parameters=GREEDY, warm=True))
        hot = client.generate(context + " and dad", parameters=GREEDY)
    (final,) = chunks
    assert final.is_final and final.tokens == [] and final.finish_reason == "length"
    assert final.stats is not None and final.stats.generated_tokens == 0
    assert hot.stats.cached_prompt_tokens == final.stats.prompt_tokens


def test_ffai_generate_warm(worker: WorkerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FFAI_ENDPOINT"}
    prompt = "Ben had a big blue kite that flew high over the hill every windy day"
    done = subprocess.run(
        [str(BIN / "ffai"), "generate", "--endpoint", worker.endpoint, "--warm", prompt],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "ffai: warmed" in done.stderr
    with Client(worker.endpoint) as client:
        hot = client.generate(prompt + " in", parameters=GREEDY)
    assert hot.stats.cached_prompt_tokens == hot.stats.prompt_tokens - 1


def test_zero_turns_the_cache_off() -> None:
    w = WorkerProcess(TINYSTORIES, "--prompt-cache-bytes", "0")
    try:
        with Client(w.endpoint) as client:
            client.generate(PROMPT, parameters=GREEDY)
            again = client.generate(PROMPT, parameters=GREEDY)
            info = client.info()
        assert again.stats.cached_prompt_tokens == 0
        assert info.prompt_cache_capacity_bytes == 0 and info.prompt_cache_hits == 0
        assert "prompt cache off" in w.log()
    finally:
        w.stop()


def test_a_bad_size_is_a_usage_error() -> None:
    done = subprocess.run(
        [str(BIN / "ffai-worker"), "serve", "--prompt-cache-bytes", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not a size" in done.stderr
