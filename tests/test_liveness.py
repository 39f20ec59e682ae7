"""Liveness against real worker processes: busy is not dead, dead is noticed at once (SPEC 8)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import zmq
from conftest import TINYSTORIES, TOKENIZERS, WorkerProcess, free_tcp_endpoint

from ffai_client import (
    AsyncClient,
    Client,
    GenerationParameters,
    RequestTimeout,
    WorkerUnavailable,
)
from ffai_client import protocol as p

ENDLESS = GenerationParameters(temperature=0, max_tokens=100_000, stop_on_eos=False)
HEARTBEAT_S = 0.2  # the clients here declare a silent connection dead after 3 x this
LONG_PROMPT_TOKENS = 1200


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama whose prefill of LONG_PROMPT_TOKENS in one chunk takes seconds here."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("heavy-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "llama3" / name, folder / name)
    return folder


def test_long_step_is_not_death(heavy_model: Path) -> None:
    """One step many heartbeat timeouts long: no client raises, and both finish."""
    # No prefix cache: the calibration run must not turn the measured prefill into a hit.
    worker = WorkerProcess(heavy_model, "--prefill-step-size", "4096", "--prompt-cache-bytes", "0")
    long_prompt = [100 + i % 1000 for i in range(LONG_PROMPT_TOKENS)]
    long_params = GenerationParameters(max_tokens=2)

    async def calibrate() -> float:
        """This machine's time for the long prefill (also warms the worker up)."""
        async with AsyncClient(worker.endpoint) as client:
            result = await client.generate(tokens=long_prompt, parameters=long_params)
            return result.stats.prefill_time_s

    async def main(heartbeat_s: float) -> None:
        async with AsyncClient(
            worker.endpoint, timeout=1.0, heartbeat_interval=heartbeat_s
        ) as client:
            streaming = client.generate_stream(
                "Hello", parameters=GenerationParameters(temperature=0, max_tokens=40)
            )
            await streaming.__anext__()  # running before the long prompt arrives
            long_one = await client.generate(tokens=long_prompt, parameters=long_params)
            rest = [chunk async for chunk in streaming]
            assert rest[-1].finish_reason == "length", rest[-1]
            assert long_one.stats.prompt_tokens == LONG_PROMPT_TOKENS, long_one.stats
            # The single prefill step really outlasted the client's dead-peer timeout.
            assert long_one.stats.prefill_time_s > 2 * 3 * heartbeat_s, long_one.stats

    try:
        step_s = asyncio.run(calibrate())
        # Heartbeats at step/12: the step lasts four times the 3-heartbeat timeout.
        asyncio.run(main(max(0.05, step_s / 12)))
    finally:
        worker.stop()


def test_request_timeout_is_per_request(heavy_model: Path) -> None:
    """`request_timeout` ends only the silent request, with RequestTimeout, not the others."""
    worker = WorkerProcess(heavy_model, "--prefill-step-size", "4096")
    long_prompt = [100 + i % 1000 for i in range(LONG_PROMPT_TOKENS)]

    async def main() -> None:
        async with AsyncClient(worker.endpoint, heartbeat_interval=HEARTBEAT_S) as client:
            patient = asyncio.create_task(
                client.generate("Hi", parameters=GenerationParameters(max_tokens=3))
            )
            stream = client.generate_stream(
                tokens=long_prompt,
                parameters=GenerationParameters(max_tokens=2),
                request_timeout=0.5,
            )
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout):
                async for _ in stream:
                    pass
            assert time.monotonic() - t0 < 5.0
            assert (await patient).finish_reason == "length"
            assert (await client.ping()).running == 0  # the timed-out one was cancelled

    try:
        asyncio.run(main())
    finally:
        worker.stop()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_killed_worker_noticed_within_a_second(transport: str) -> None:
    extra = ("--endpoint", free_tcp_endpoint()) if transport == "tcp" else ()
    worker = WorkerProcess(TINYSTORIES, *extra)
    endpoint = extra[1] if extra else worker.endpoint

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=30.0) as client:
            stream = client.generate_stream("Once upon a time", parameters=ENDLESS)
            await stream.__anext__()
            worker.proc.kill()
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable) as caught:
                async for _ in stream:
                    pass
            elapsed = time.monotonic() - t0
            assert elapsed <= 1.0, f"noticed after {elapsed:.2f} s"
            assert "went away" in str(caught.value)

    try:
        asyncio.run(main())
    finally:
        worker.stop()


def test_stopped_worker_noticed_within_heartbeat_timeout() -> None:
    worker = WorkerProcess(TINYSTORIES)

    async def main() -> None:
        async with AsyncClient(worker.endpoint, heartbeat_interval=HEARTBEAT_S) as client:
            stream = client.generate_stream("Once upon a time", parameters=ENDLESS)
            await stream.__anext__()
            os.kill(worker.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(WorkerUnavailable):
                    async for _ in stream:
                        pass
                elapsed = time.monotonic() - t0
            finally:
                os.kill(worker.proc.pid, signal.SIGCONT)
            # Within 3 heartbeat intervals (SPEC 8), plus the watchdog tick and a loaded machine.
            assert elapsed < 3 * HEARTBEAT_S + 0.5, f"noticed after {elapsed:.2f} s"

    try:
        asyncio.run(main())
    finally:
        worker.stop()


def test_no_socket_file_fails_at_once(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=30.0) as client:
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="start one with `ffai-worker serve`"):
                await client.ping()
            assert time.monotonic() - t0 < 1.0

    asyncio.run(main())


def test_unreachable_tcp_fails_after_connect_timeout() -> None:
    endpoint = free_tcp_endpoint()  # nobody listens there

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=0.5) as client:
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="could not reach"):
                await client.ping()
            assert 0.4 < time.monotonic() - t0 < 3.0

    asyncio.run(main())


def test_restarted_worker_gets_new_requests(tmp_path: Path) -> None:
    first = WorkerProcess(TINYSTORIES)

    async def main() -> None:
        async with AsyncClient(first.endpoint) as client:
            assert (await client.ping()).running == 0
            first.stop(signal.SIGKILL)
            second = WorkerProcess(TINYSTORIES, "--endpoint", first.endpoint)
            try:
                result = await client.generate(
                    "Once upon a time", parameters=GenerationParameters(max_tokens=5)
                )
                assert len(result.generated_tokens) == 5
            finally:
                second.stop()

    asyncio.run(main())


def _frames_sent_once_settled(observer: Client, since: int, at_least: int) -> int:
    """Frames the worker sent since `since`, once it has sent `at_least` and stopped."""
    last = observer.info().frames_sent
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = observer.info().frames_sent
        # Only the previous info reply went out in between: the pipe is full (or drained).
        if now - last <= 1 and now - since >= at_least:
            return now - since
        last = now
    raise AssertionError("the worker never settled")


def test_replies_to_a_client_that_does_not_read_are_queued_not_dropped() -> None:
    """15,000 frames sent without reading, then a ping: every reply arrives once it reads."""
    worker = WorkerProcess(TINYSTORIES)
    count = 15_000
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1000)  # a small window, so the worker's side fills up
    sock.setsockopt(zmq.LINGER, 0)
    try:
        with Client(worker.endpoint) as observer:
            sent_before = observer.info().frames_sent
            sock.connect(worker.endpoint)
            for i in range(count):
                sock.send(p.encode(p.Ping(id=f"p{i}")))
            sock.send(p.encode(p.Ping(id="last")))
            sent = _frames_sent_once_settled(observer, sent_before, 1000)
        # The pipe really filled: part of the replies waited in the worker's queue.
        assert sent < count + 1, f"all {sent} replies fit the pipe: nothing was queued"
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while len(seen) < count + 1 and time.monotonic() < deadline:
            if sock.poll(1000):
                msg = p.decode_worker(sock.recv())
                assert isinstance(msg, p.Pong)
                seen.append(str(msg.id))
        assert seen == [f"p{i}" for i in range(count)] + ["last"]
    finally:
        sock.close()
        worker.stop()
