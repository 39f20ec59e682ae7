"""Many workers, one client: load spreading, prefix affinity, DNS names, and a killed worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import TINYSTORIES, WorkerProcess, free_port

from ffai_client import AsyncClient, Client, GenerationParameters, WorkerUnavailable
from ffai_client.pool import (
    affinity_key,
    dns_target,
    rank,
    split_endpoints,
    tcp_endpoint,
)
from ffai_client.protocol import Generate
from ffai_client.types import ChatMessage

SHORT = GenerationParameters(max_tokens=12, temperature=0.0)
LONG = GenerationParameters(max_tokens=400, temperature=0.0, stop_on_eos=False)


def _start(*extra: str) -> WorkerProcess:
    return WorkerProcess(TINYSTORIES, "--max-queue", "64", "--max-batch", "8", *extra)


@pytest.fixture(scope="module")
def three_workers() -> Iterator[list[WorkerProcess]]:
    workers = [_start() for _ in range(3)]
    yield workers
    for worker in workers:
        worker.stop()


async def _frames_sent(endpoints: list[str]) -> list[int]:
    """Each worker's own count of frames it sent (asked over a separate one-worker client)."""
    counts = []
    for endpoint in endpoints:
        async with AsyncClient(endpoint) as one:
            counts.append((await one.info()).frames_sent or 0)
    return counts


# -- pure parts ------------------------------------------------------------------------
def test_endpoints_split_and_names_are_told_from_addresses() -> None:
    assert split_endpoints("ipc:///a, ipc:///b,,ipc:///a") == ["ipc:///a", "ipc:///b"]
    assert split_endpoints(["tcp://127.0.0.1:1", "tcp://[::1]:1,ipc:///c"]) == [
        "tcp://127.0.0.1:1",
        "tcp://[::1]:1",
        "ipc:///c",
    ]
    assert dns_target("tcp://workers.ffai.svc:5555") == ("workers.ffai.svc", 5555)
    for literal in ("tcp://127.0.0.1:5", "tcp://[::1]:5", "ipc:///x", "tcp://*:5"):
        assert dns_target(literal) is None
    assert tcp_endpoint("::1", 7) == "tcp://[::1]:7"
    assert tcp_endpoint("10.0.0.2", 7) == "tcp://10.0.0.2:7"


def test_rendezvous_moves_only_the_keys_of_a_removed_worker() -> None:
    three = ["tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.3:1"]
    keys = [f"prompt {i}".encode() for i in range(300)]
    before = {k: rank(k, three)[0] for k in keys}
    assert set(Counter(before.values())) == set(three)  # every worker holds some keys
    after = {k: rank(k, three[:2])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == three[2] for k in moved)


def test_a_conversation_keeps_its_key_across_turns() -> None:
    system = ChatMessage(role="system", content="You are terse.")
    first = [system, ChatMessage(role="user", content="Hi, I am Ann.")]
    later = [*first, ChatMessage(role="assistant", content="Hi."), ChatMessage("user", "Bye")]
    other = [system, ChatMessage(role="user", content="Hi, I am Bob.")]

    def key(messages: list[ChatMessage]) -> bytes:
        return affinity_key(Generate(id="x", messages=messages))

    assert key(first) == key(later) != key(other)
    long = "Once upon a time " * 40
    assert affinity_key(Generate(id="x", prompt=long + "A")) == affinity_key(
        Generate(id="y", prompt=long + "B")
    )


# -- real workers ----------------------------------------------------------------------
def test_load_spreads_over_three_workers(three_workers: list[WorkerProcess]) -> None:
    endpoints = [w.endpoint for w in three_workers]

    async def go() -> Counter[str]:
        async with AsyncClient(endpoints) as client:

            async def one() -> str | None:
                # One shared prompt: its affinity worker alone would take all twelve.
                async with client.generate_stream("Once upon a time", parameters=SHORT) as s:
                    endpoint = s.endpoint
                    async for _ in s:
                        pass
                return endpoint

            return Counter(await asyncio.gather(*(one() for _ in range(24))))

    served = asyncio.run(go())
    assert set(served) == set(endpoints), served
    # Bounded load: no worker above 1.25 x the mean (24 / 3).
    assert max(served.values()) <= 10, served


def test_the_sync_client_and_the_cli_take_a_list(three_workers: list[WorkerProcess]) -> None:
    endpoints = [w.endpoint for w in three_workers]
    with Client(",".join(endpoints)) as client:
        streams = [client.generate_stream(f"Story {i}", parameters=SHORT) for i in range(6)]
        for stream in streams:
            assert "".join(chunk.text for chunk in stream)
    env = {**os.environ, "FFAI_ENDPOINT": ",".join(endpoints)}
    cli = [sys.executable, "-m", "ffai_client.cli", "generate", "--max-tokens", "8", "Once"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_same_prefix_goes_to_the_same_worker(three_workers: list[WorkerProcess]) -> None:
    endpoints = [w.endpoint for w in three_workers]
    prompts = [f"Once upon a time, {name} went" for name in ("Lily", "Ben", "Tom", "Sue", "Max")]

    async def go() -> tuple[dict[str, set[str | None]], list[int], list[int]]:
        before = await _frames_sent(endpoints)
        where: dict[str, set[str | None]] = {p: set() for p in prompts}
        async with AsyncClient(endpoints) as client:
            for _ in range(3):
                for prompt in prompts:
                    async with client.generate_stream(prompt, parameters=SHORT) as s:
                        async for _ in s:
                            pass
                        where[prompt].add(s.endpoint)
        return where, before, await _frames_sent(endpoints)

    where, before, after = asyncio.run(go())
    for prompt, seen in where.items():
        assert seen == {rank(affinity_key(Generate(id="x", prompt=prompt)), endpoints)[0]}, prompt
    # The workers' own counters agree: each sent frames in proportion to its prompts.
    chosen = Counter(next(iter(seen)) for seen in where.values())
    for endpoint, low, high in zip(endpoints, before, after, strict=True):
        if chosen[endpoint]:
            assert high - low >= 3 * chosen[endpoint] * 2  # a chunk and a final per request


def test_a_dns_name_is_resolved_with_the_system_resolver() -> None:
    port = free_port()
    worker = _start("--endpoint", f"tcp://127.0.0.1:{port}")
    try:

        async def go() -> str | None:
            async with AsyncClient(f"tcp://localhost:{port}", timeout=10) as client:
                async with client.generate_stream("Once", parameters=SHORT) as s:
                    async for _ in s:
                        pass
                    return s.endpoint

        assert asyncio.run(go()) == f"tcp://127.0.0.1:{port}"
    finally:
        worker.stop()


def test_a_name_with_two_addresses_spreads_and_is_re_resolved() -> None:
    """A headless Service in miniature: one name, an IPv4 and an IPv6 worker on one port."""
    port = free_port()
    v4 = _start("--endpoint", f"tcp://127.0.0.1:{port}")
    v6 = _start("--endpoint", f"tcp://[::1]:{port}")
    records = {"workers.test": ["127.0.0.1"]}

    def resolver(host: str, _port: int) -> list[str]:
        return list(records[host])  # a real lookup, in a table the test can change

    async def served(client: AsyncClient, n: int) -> set[str | None]:
        async def one(i: int) -> str | None:
            async with client.generate_stream(f"Tale {i}", parameters=SHORT) as s:
                async for _ in s:
                    pass
                return s.endpoint

        return set(await asyncio.gather(*(one(i) for i in range(n))))

    async def go() -> list[set[str | None]]:
        name = f"tcp://workers.test:{port}"
        async with AsyncClient(name, resolver=resolver, resolve_interval=0.1) as client:
            first = await served(client, 4)
            records["workers.test"] = ["127.0.0.1", "::1"]
            await asyncio.sleep(0.5)
            second = await served(client, 12)
            records["workers.test"] = ["::1"]
            await asyncio.sleep(0.5)
            third = await served(client, 4)
            return [first, second, third]

    try:
        first, second, third = asyncio.run(go())
    finally:
        v4.stop()
        v6.stop()
    assert first == {f"tcp://127.0.0.1:{port}"}
    assert second == {f"tcp://127.0.0.1:{port}", f"tcp://[::1]:{port}"}
    assert third == {f"tcp://[::1]:{port}"}


def _prompts_for(endpoint: str, endpoints: list[str], n: int, taken: set[str]) -> list[str]:
    """`n` prompts whose affinity worker is `endpoint`."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        prompt = f"Once upon a time, a cat number {i} said"
        i += 1
        key = affinity_key(Generate(id="x", prompt=prompt))
        if prompt not in taken and rank(key, endpoints)[0] == endpoint:
            found.append(prompt)
    return found


async def _reference(endpoint: str, prompts: list[str]) -> dict[str, str]:
    async with AsyncClient(endpoint) as one:
        return {p: (await one.generate(p, parameters=LONG)).text for p in prompts}


def test_a_killed_worker_is_routed_around_without_losing_or_repeating_text() -> None:
    workers = [_start() for _ in range(3)]
    endpoints = [w.endpoint for w in workers]
    victim = workers[0]
    running: list[str] = []
    for worker in workers:  # two streams per worker, by affinity
        running += _prompts_for(worker.endpoint, endpoints, 2, set(running))
    queued = _prompts_for(victim.endpoint, endpoints, 2, set(running))
    outcome: dict[str, tuple[str, BaseException | None]] = {}
    moved_after: dict[str, float] = {}
    killed_at = 0.0

    async def consume(stream: object, prompt: str) -> None:
        text: list[str] = []
        try:
            async for chunk in stream:  # type: ignore[attr-defined]
                text.append(chunk.text)
        except WorkerUnavailable as exc:
            outcome[prompt] = ("".join(text), exc)
            return
        outcome[prompt] = ("".join(text), None)

    async def go() -> list[str | None]:
        nonlocal killed_at
        async with AsyncClient(endpoints) as client:
            streams = {p: client.generate_stream(p, parameters=LONG) for p in running}
            firsts = {p: await s.__anext__() for p, s in streams.items()}  # all under way
            on_victim = [p for p, s in streams.items() if s.endpoint == victim.endpoint]
            assert on_victim == running[:2]
            tasks = [asyncio.create_task(consume(s, p)) for p, s in streams.items()]
            victim.proc.send_signal(signal.SIGSTOP)  # frozen: what it is sent stays unanswered
            waiting = {p: client.generate_stream(p, parameters=LONG) for p in queued}
            for s in waiting.values():
                await s.__aenter__()
            assert all(s.endpoint == victim.endpoint for s in waiting.values())
            tasks += [asyncio.create_task(consume(s, p)) for p, s in waiting.items()]
            await asyncio.sleep(0.2)
            killed_at = time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            while len(moved_after) < len(waiting) and time.monotonic() - killed_at < 5:
                for p, s in waiting.items():
                    if p not in moved_after and s.endpoint != victim.endpoint:
                        moved_after[p] = time.monotonic() - killed_at
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            for p, chunk in firsts.items():  # put back the first chunks taken above
                text, error = outcome[p]
                outcome[p] = (chunk.text + text, error)
            after = []
            for i in range(6):  # new requests go to the survivors only
                async with client.generate_stream(f"Afterwards {i}", parameters=SHORT) as s:
                    async for _ in s:
                        pass
                    after.append(s.endpoint)
            return after

    try:
        after = asyncio.run(go())
        reference = asyncio.run(_reference(workers[1].endpoint, running + queued))
    finally:
        for worker in workers:
            worker.stop(signal.SIGKILL)
    assert victim.endpoint not in after
    assert len(moved_after) == len(queued) and max(moved_after.values()) < 1.0, moved_after
    for prompt in running + queued:
        text, error = outcome[prompt]
        if prompt in running[:2]:  # had tokens on the victim: fail, keeping only what came
            assert isinstance(error, WorkerUnavailable), prompt
            assert reference[prompt].startswith(text) and text != reference[prompt]
        else:  # on a survivor, or moved there before any token: whole and exact
            assert error is None, (prompt, error)
            assert text == reference[prompt], prompt


def test_the_gateway_spreads_over_replicas_and_survives_one() -> None:
    import openai
    from gateway_process import GatewayProcess

    workers = [_start() for _ in range(3)]
    endpoints = [w.endpoint for w in workers]
    gateway = GatewayProcess(",".join(endpoints))
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    try:
        before = asyncio.run(_frames_sent(endpoints))
        for i in range(12):
            oai.completions.create(model="tinystories-260k", prompt=f"Tale {i}:", max_tokens=30)
        after = asyncio.run(_frames_sent(endpoints))
        # Each request is ~30 frames at its worker; load probes add a few per second.
        assert sum(high - low >= 40 for low, high in zip(before, after, strict=True)) >= 2
        workers[0].stop(signal.SIGKILL)
        for i in range(6):
            done = oai.completions.create(
                model="tinystories-260k", prompt=f"Then {i}:", max_tokens=5
            )
            assert done.choices[0].text
    finally:
        gateway.stop()
        for worker in workers:
            worker.stop(signal.SIGKILL)


def test_a_busy_answer_before_any_token_moves_the_request() -> None:
    workers = [_start("--max-batch", "1", "--max-queue", "1") for _ in range(2)]
    endpoints = [w.endpoint for w in workers]
    prompt = _prompts_for(endpoints[0], endpoints, 1, set())[0]

    async def go() -> tuple[str | None, str, int]:
        async with AsyncClient(endpoints[0]) as other:  # another client fills worker 0
            running = other.generate_stream("Fill", parameters=LONG)
            await running.__anext__()
            queued = other.generate_stream("Fill too", parameters=LONG)
            await queued.__aenter__()
            pong = await other.ping()
            assert (pong.running, pong.waiting) == (1, 1)
            async with AsyncClient(endpoints) as client:
                async with client.generate_stream(prompt, parameters=SHORT) as stream:
                    text = "".join([chunk.text async for chunk in stream])
                    endpoint = stream.endpoint
                retried = client._router.stats.retried
            await running.aclose()
            await queued.aclose()
        return endpoint, text, retried

    try:
        endpoint, text, retried = asyncio.run(go())
    finally:
        for worker in workers:
            worker.stop(signal.SIGKILL)
    assert (endpoint, retried) == (endpoints[1], 1) and text
