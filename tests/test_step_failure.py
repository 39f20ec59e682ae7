"""A failing engine step: its requests end with `internal`, the worker keeps serving.

The fault is injected by making our own decoder raise once (nothing from
ZeroMQ, MLX or the tokenizer is replaced); everything else is real.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import TINYSTORIES

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client import AsyncClient, GenerationParameters
from ffai_client.errors import InternalError
from ffai_worker.engine import Engine, StepFailed
from ffai_worker.engine.types import RequestKey
from ffai_worker.serving.server import ServerConfig, Worker

PARAMS = GenerationParameters(temperature=0.0, max_tokens=30, stop_on_eos=False)


class FailOnce:
    """Wraps the real decoder; its next call raises, later calls decode normally."""

    def __init__(self, decoder: Any) -> None:
        self.decoder, self.armed = decoder, False

    def __call__(self, *args: Any) -> Any:
        if self.armed:
            self.armed = False
            raise RuntimeError("injected fault")
        return self.decoder(*args)


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine.load(TINYSTORIES)
    engine.runner.decoder = FailOnce(engine.runner.decoder)  # type: ignore[assignment]
    yield engine


def test_engine_drops_everything_and_recovers(engine: Engine) -> None:
    expected = engine.generate("Once upon a time", parameters=PARAMS).generated_tokens
    for i in range(2):
        engine.submit(
            engine.new_request(RequestKey(b"k", str(i)), prompt="The cat", parameters=PARAMS)
        )
    engine.step()  # prefill (and the first decode) succeed
    engine.runner.decoder.armed = True  # type: ignore[attr-defined]
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert sorted(failed.value.keys) == [RequestKey(b"k", "0"), RequestKey(b"k", "1")]
    assert not engine.has_work() and engine.cache.allocated_bytes == 0
    again = engine.generate("Once upon a time", parameters=PARAMS).generated_tokens
    assert again == expected


def test_worker_answers_internal_and_keeps_serving(engine: Engine) -> None:
    expected = engine.generate("Once upon a time", parameters=PARAMS)
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='ffai-test-')}/w.sock"
    worker = Worker(engine, ServerConfig(endpoint=endpoint))
    worker.bind()
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()

    async def main() -> None:
        async with AsyncClient(endpoint) as client:
            # Armed before the request: its prefill succeeds, its first decode fails.
            engine.runner.decoder.armed = True  # type: ignore[attr-defined]
            with pytest.raises(InternalError, match="injected fault"):
                async for _chunk in client.generate_stream("The cat", parameters=PARAMS):
                    pass
            assert not engine.runner.decoder.armed  # type: ignore[attr-defined]
            result = await client.generate("Once upon a time", parameters=PARAMS)
            assert result.generated_tokens == expected.generated_tokens
            assert result.text == expected.text
            info = await client.info()
            assert info.running == 0

    try:
        asyncio.run(main())
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
