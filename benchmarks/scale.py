"""Many workers, one client (issue 17): aggregate throughput of 3 workers vs 1 behind one
`AsyncClient` with 24 concurrent streams, how often a request lands on its prefix-affinity
worker, and how fast the client routes around a SIGKILLed worker. Prints one line per figure.

    python benchmarks/scale.py [--model FOLDER] [--streams 24] [--tokens 200] [--rounds 3]

Throughput scales with cores, not workers: on a machine with fewer free cores than
workers the 3-worker figure measures contention (the script prints the core count).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ffai_client import AsyncClient, GenerationParameters, WorkerUnavailable
from ffai_client.stream import GenerationStream


def start_worker(model: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    log = tempfile.NamedTemporaryFile(prefix="ffai-bench-", suffix=".log", delete=False)
    args = [sys.executable, "-m", "ffai_worker.cli", "serve", "--model", model]
    args += ["--endpoint", endpoint, "--max-batch", "8", "--max-queue", "256"]
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while b"serving on" not in Path(log.name).read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(Path(log.name).read_text())
        time.sleep(0.05)
    return proc, endpoint


def conversation(i: int) -> str:
    return f"Conversation {i}. Once upon a time, a child named Kid{i} found a"


async def drain(stream: GenerationStream) -> tuple[int, str | None]:
    tokens = 0
    async with stream:
        async for chunk in stream:
            tokens += len(chunk.tokens)
        return tokens, stream.endpoint


async def throughput(
    endpoints: list[str], streams: int, tokens: int, rounds: int
) -> tuple[float, float, float]:
    """tok/s over `rounds` of `streams` concurrent conversations (the same ones each round);
    the fraction routed to their affinity worker, and the fraction that stayed on last
    round's worker."""
    params = GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)
    total = 0
    where: dict[int, str | None] = {}
    stayed = moved = 0
    async with AsyncClient(endpoints) as client:
        await asyncio.gather(*(client.ping() for _ in endpoints))  # connections up
        t0 = time.monotonic()
        for _ in range(rounds):
            jobs = [
                drain(client.generate_stream(conversation(i), parameters=params))
                for i in range(streams)
            ]
            for i, (n, endpoint) in enumerate(await asyncio.gather(*jobs)):
                total += n
                if i in where:
                    stayed, moved = stayed + (where[i] == endpoint), moved + (where[i] != endpoint)
                where[i] = endpoint
        elapsed = time.monotonic() - t0
        stats = client._router.stats  # private counters, read for this benchmark only
    hit = stats.affinity_hits / stats.keyed if stats.keyed else 1.0
    return total / elapsed, hit, stayed / max(1, stayed + moved)


async def moves(since: float, streams: list[GenerationStream], dead: str) -> list[float]:
    """Seconds from `since` until each stream's request was sent to another worker."""
    times: dict[int, float] = {}
    while len(times) < len(streams) and time.monotonic() - since < 10:
        for i, stream in enumerate(streams):
            if i not in times and stream.endpoint != dead:
                times[i] = time.monotonic() - since
        await asyncio.sleep(0.002)
    return list(times.values())


async def kill_one(model: str, streams: int, tokens: int) -> None:
    """SIGKILL one of 3 workers under `streams` running plus as many queued requests."""
    workers = [start_worker(model) for _ in range(3)]
    endpoints = [e for _, e in workers]
    params = GenerationParameters(temperature=0.0, max_tokens=tokens, stop_on_eos=False)
    got: dict[int, list[str]] = {}
    failed_after: list[float] = []
    first_token_after: dict[int, float] = {}
    killed_at = 0.0

    async def run(i: int, stream: GenerationStream) -> None:
        got[i] = []
        try:
            async for chunk in stream:
                if killed_at and i not in first_token_after and not got[i]:
                    first_token_after[i] = time.monotonic() - killed_at
                got[i].append(chunk.text)
        except WorkerUnavailable:
            failed_after.append(time.monotonic() - killed_at)

    try:
        async with AsyncClient(endpoints) as client:
            await asyncio.gather(*(client.ping() for _ in endpoints))
            # 2 x 24 streams over 3 workers of 8 batch slots: half run, half wait there.
            all_streams = [
                client.generate_stream(conversation(i), parameters=params)
                for i in range(2 * streams)
            ]
            tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(all_streams)]
            while sum(1 for t in got.values() if t) < streams:
                await asyncio.sleep(0.01)
            by_worker = {e: [s for s in all_streams if s.endpoint == e] for e in endpoints}
            victim = max(workers, key=lambda w: len(by_worker[w[1]]))
            waiting = [
                i for i, s in enumerate(all_streams) if s.endpoint == victim[1] and not got.get(i)
            ]
            killed_at = time.monotonic()
            victim[0].send_signal(signal.SIGKILL)
            moved_after = await moves(killed_at, [all_streams[i] for i in waiting], victim[1])
            await asyncio.gather(*tasks)
            retried = client._router.stats.retried
            after = [
                await drain(client.generate_stream(f"After {i}", parameters=params))
                for i in range(6)
            ]
            # Exactness: each moved request equals the same request run again now.
            mismatched = 0
            for i in waiting:
                again = await client.generate(conversation(i), parameters=params)
                mismatched += again.text != "".join(got[i])
    finally:
        for proc, _ in workers:
            proc.kill()
            proc.wait()
    on_victim = len(by_worker[victim[1]])
    moved_first = [first_token_after[i] for i in waiting if i in first_token_after]
    print(f"SIGKILL 1 of 3 workers under {2 * streams} streams ({on_victim} on it):")
    print(
        f"  streams with tokens failed with WorkerUnavailable: {len(failed_after)}, "
        f"after max {max(failed_after, default=0) * 1000:.1f} ms"
    )
    print(
        f"  requests without tokens moved to a survivor: {retried} (of {len(waiting)} "
        f"waiting there), all within {max(moved_after, default=0) * 1000:.1f} ms; their "
        f"first token after the kill (behind the survivors' queues): median "
        f"{statistics.median(moved_first or [0]) * 1000:.0f} ms, "
        f"max {max(moved_first, default=0) * 1000:.0f} ms; text mismatches: {mismatched}"
    )
    print(
        f"  requests after the kill on the dead worker: "
        f"{sum(1 for _, e in after if e == victim[1])} of {len(after)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    default = str(Path(__file__).resolve().parents[1] / "ffai_worker" / "default_model")
    parser.add_argument("--model", default=default)
    parser.add_argument("--streams", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"cores: {os.cpu_count()}; model {args.model}; {args.streams} concurrent streams x "
        f"{args.tokens} tokens x {args.rounds} rounds"
    )
    results = {}
    for n in (1, 3):
        workers = [start_worker(args.model) for _ in range(n)]
        try:
            results[n] = asyncio.run(
                throughput([e for _, e in workers], args.streams, args.tokens, args.rounds)
            )
        finally:
            for proc, _ in workers:
                proc.kill()
                proc.wait()
        rate, hit, stayed = results[n]
        print(
            f"{n} worker(s): {rate:.0f} tok/s aggregate; affinity worker hit {hit:.0%}; "
            f"same worker as the conversation's previous round {stayed:.0%}"
        )
    print(f"3 workers / 1 worker: {results[3][0] / results[1][0]:.2f}x")
    asyncio.run(kill_one(args.model, args.streams, args.tokens))


if __name__ == "__main__":
    main()
