"""The served path: a real worker process, real sockets, real client processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import AsyncClient, Client, ShuttingDown, WorkerUnavailable
from ffai_client.types import GenerationParameters

GREEDY = GenerationParameters(temperature=0.0, max_tokens=120, stop_on_eos=False)
ENDLESS = GenerationParameters(temperature=0.0, max_tokens=15000, stop_on_eos=False)


@pytest.fixture(scope="module")
def slow_worker(slow_model: Path) -> WorkerProcess:
    worker = WorkerProcess(slow_model, "--max-batch", "8")
    yield worker
    worker.stop()


async def wait_idle(client: AsyncClient, baseline: int, within: float = 1.0) -> None:
    """Assert the worker reports no live sequences and idle KV bytes within `within` s."""
    deadline = time.monotonic() + within
    while True:
        info = await client.info()
        if info.running == 0 and info.waiting == 0 and info.kv_cache_bytes == baseline:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {within} s: {info}")
        await asyncio.sleep(0.02)


def test_served_output_equals_in_process(tinystories_worker: WorkerProcess) -> None:
    import ffai_worker  # noqa: F401
    from ffai_worker.engine import Engine

    engine = Engine.load(TINYSTORIES)
    local = engine.generate("Once upon a time", parameters=GREEDY)
    lily = engine.generate("Lily and Ben", parameters=GREEDY)
    with Client(tinystories_worker.endpoint) as client:
        served = client.generate("Once upon a time", parameters=GREEDY)
        chunks = list(client.generate_stream("Lily and Ben", parameters=GREEDY))
    assert served.generated_tokens == local.generated_tokens
    assert served.text == local.text
    assert served.stats.generated_tokens == 120 and served.finish_reason == "length"
    assert chunks[-1].is_final and chunks[-1].stats is not None
    assert [t for c in chunks for t in c.tokens] == lily.generated_tokens
    assert "".join(c.text for c in chunks) == lily.text and lily.text.startswith(" ")


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ffai_client import Client, GenerationParameters
    endpoint, prompt = sys.argv[1], sys.argv[2]
    params = GenerationParameters(temperature=0.0, max_tokens=100, stop_on_eos=False)
    with Client(endpoint, timeout=30) as client:
        client.ping()
        print("ready", flush=True)
        sys.stdin.readline()  # all eight start together
        r = client.generate(prompt, parameters=params)
    out = {"tokens": r.generated_tokens, "text": r.text, "batch": r.stats.max_batch_size}
    print(json.dumps(out))
    """
)


def test_eight_client_processes_at_once(tinystories_worker: WorkerProcess) -> None:
    import ffai_worker  # noqa: F401
    from ffai_worker.engine import Engine

    prompts = [
        f"Once upon a time there was a {w}" for w in "cat dog bird fish frog king girl boy".split()
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, tinystories_worker.endpoint, p],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for p in prompts
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    for proc in procs:  # release all eight before waiting on any
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    outputs = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert max(out["batch"] for out in outputs) > 1  # they really were decoded together
    engine = Engine.load(TINYSTORIES)
    params = GenerationParameters(temperature=0.0, max_tokens=100, stop_on_eos=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = engine.generate(prompt, parameters=params)
        assert out["tokens"] == expected.generated_tokens
        assert out["text"] == expected.text


@pytest.mark.parametrize("how", ["break", "aclose", "task_cancel", "explicit"])
def test_cancel_frees_the_sequence(slow_worker: WorkerProcess, how: str) -> None:
    async def main() -> None:
        async with AsyncClient(slow_worker.endpoint) as client:
            baseline = (await client.info()).kv_cache_bytes
            assert baseline == 0
            stream = client.generate_stream("Hello", parameters=ENDLESS)
            if how == "break":
                async with stream:
                    n = 0
                    async for _chunk in stream:
                        n += 1
                        if n == 3:
                            break
                assert stream.final is not None and stream.final.finish_reason == "cancelled"
            elif how == "aclose":
                await stream.__anext__()
                await stream.aclose()
                assert stream.final is not None and stream.final.finish_reason == "cancelled"
            elif how == "task_cancel":
                started = asyncio.Event()

                async def consume() -> None:
                    async for _chunk in stream:
                        started.set()

                task = asyncio.create_task(consume())
                await started.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await stream.aclose()  # collects the terminal frame the cancel caused
                assert stream.final is not None and stream.final.finish_reason == "cancelled"
            else:
                chunks = []
                async for chunk in stream:
                    chunks.append(chunk)
                    if len(chunks) == 3:
                        await client.cancel(stream.request_id)
                        await client.cancel(stream.request_id)  # twice: harmless
                assert chunks[-1].finish_reason == "cancelled" and chunks[-1].is_final
                assert len(chunks) < 1000
            await client.cancel("no-such-request")  # unknown id: harmless
            await wait_idle(client, baseline, within=1.0)
            assert (await client.ping()).running == 0

    asyncio.run(main())


KILLED_CLIENT = textwrap.dedent(
    """
    import sys
    from ffai_client import Client, GenerationParameters
    params = GenerationParameters(temperature=0.0, max_tokens=15000, stop_on_eos=False)
    with Client(sys.argv[1]) as client:
        for i, chunk in enumerate(client.generate_stream("Hello", parameters=params)):
            if i == 5:
                print("streaming", flush=True)
    """
)


def test_killed_client_is_freed_and_others_unaffected(slow_worker: WorkerProcess) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, slow_worker.endpoint], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"streaming"

    async def main() -> None:
        async with AsyncClient(slow_worker.endpoint) as client:
            other = client.generate_stream(
                "Other",
                parameters=GenerationParameters(temperature=0, max_tokens=400, stop_on_eos=False),
            )
            await other.__anext__()
            assert (await client.info()).running == 2
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            deadline = time.monotonic() + 2.0
            while (await client.info()).running > 1:
                assert time.monotonic() < deadline, (
                    "killed client's sequence still running after 2 s"
                )
                await asyncio.sleep(0.05)
            rest = [c async for c in other]
            assert rest[-1].finish_reason == "length" and rest[-1].stats is not None
            assert rest[-1].stats.generated_tokens == 400
            await wait_idle(client, 0)

    asyncio.run(main())


def test_killed_worker_raises_worker_unavailable(slow_model: Path) -> None:
    worker = WorkerProcess(slow_model)

    async def main() -> None:
        async with AsyncClient(worker.endpoint, timeout=3.0) as client:
            stream = client.generate_stream("Hello", parameters=ENDLESS)
            await stream.__anext__()
            worker.proc.kill()
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable):
                async for _chunk in stream:
                    pass
            assert time.monotonic() - t0 < 5.0
            with pytest.raises(WorkerUnavailable):
                await client.ping()
            # A restarted worker on the same endpoint gets new requests.
            restarted = WorkerProcess.__new__(WorkerProcess)
            restarted.__dict__.update(worker.__dict__)
            restarted.log_path = Path(worker.dir) / "worker2.log"
            restarted._log = open(restarted.log_path, "wb")
            restarted.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ffai_worker.cli",
                    "serve",
                    "--model",
                    str(slow_model),
                    "--endpoint",
                    worker.endpoint,
                ],
                stdout=restarted._log,
                stderr=subprocess.STDOUT,
            )
            try:
                restarted.wait_ready()
                assert (await client.ping()).running == 0
            finally:
                restarted.stop()

    try:
        asyncio.run(main())
    finally:
        worker.stop()


def test_sigterm_ends_streams_with_shutting_down(slow_model: Path) -> None:
    worker = WorkerProcess(slow_model)
    socket_file = Path(worker.endpoint[len("ipc://") :])

    async def main() -> None:
        async with AsyncClient(worker.endpoint) as client:
            stream = client.generate_stream("Hello", parameters=ENDLESS)
            await stream.__anext__()
            worker.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ShuttingDown):
                async for _chunk in stream:
                    pass

    asyncio.run(main())
    assert worker.proc.wait(10) == 0, worker.log()  # exits by itself after the first SIGTERM
    worker.stop()
    assert not socket_file.exists()
