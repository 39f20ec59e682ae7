"""Liveness and bounded-work figures (issue: hardening): how fast death is noticed,
how fast oversized input is refused. Prints one line per figure.

    python benchmarks/liveness.py [--model FOLDER] [--reps 5]
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

from ffai_client import AsyncClient, GenerationParameters, PromptTooLong, WorkerUnavailable

ENDLESS = GenerationParameters(temperature=0, max_tokens=100_000, stop_on_eos=False)


def start_worker(model: str, endpoint: str) -> subprocess.Popen[bytes]:
    log = tempfile.NamedTemporaryFile(prefix="ffai-bench-", suffix=".log", delete=False)
    args = [sys.executable, "-m", "ffai_worker.cli", "serve", "--model", model]
    proc = subprocess.Popen([*args, "--endpoint", endpoint], stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while b"serving on" not in Path(log.name).read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(Path(log.name).read_text())
        time.sleep(0.05)
    return proc


def endpoint_for(transport: str) -> str:
    if transport == "tcp":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return f"ipc://{tempfile.mkdtemp(prefix='ffai-bench-')}/w.sock"


async def time_to_notice(model: str, transport: str, sig: int, heartbeat_s: float) -> float:
    """Seconds from the signal to WorkerUnavailable on a streaming request."""
    endpoint = endpoint_for(transport)
    proc = start_worker(model, endpoint)
    try:
        async with AsyncClient(endpoint, heartbeat_interval=heartbeat_s) as client:
            stream = client.generate_stream("Once upon a time", parameters=ENDLESS)
            await stream.__anext__()
            os.kill(proc.pid, sig)
            t0 = time.monotonic()
            try:
                async for _ in stream:
                    pass
            except WorkerUnavailable:
                return time.monotonic() - t0
            raise RuntimeError("the stream ended without an error")
    finally:
        if sig == signal.SIGSTOP:
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


async def refusal_ms(model: str, size: int) -> float:
    endpoint = endpoint_for("ipc")
    proc = start_worker(model, endpoint)
    try:
        async with AsyncClient(endpoint) as client:
            await client.ping()
            t0 = time.monotonic()
            try:
                await client.generate("a" * size, parameters=GenerationParameters(max_tokens=1))
            except PromptTooLong:
                return (time.monotonic() - t0) * 1000
            raise RuntimeError("an oversized prompt was accepted")
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    default = str(Path(__file__).resolve().parents[1] / "ffai_worker" / "default_model")
    parser.add_argument("--model", default=default)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    for transport in ("ipc", "tcp"):
        kills = [
            asyncio.run(time_to_notice(args.model, transport, signal.SIGKILL, 1.0))
            for _ in range(args.reps)
        ]
        median_ms, max_ms = statistics.median(kills) * 1000, max(kills) * 1000
        print(
            f"SIGKILL -> WorkerUnavailable ({transport}): median {median_ms:.1f} ms,"
            f" max {max_ms:.1f} ms over {args.reps}"
        )
    for heartbeat in (0.2, 1.0):
        stop = asyncio.run(time_to_notice(args.model, "ipc", signal.SIGSTOP, heartbeat))
        print(
            f"SIGSTOP -> WorkerUnavailable (heartbeat {heartbeat} s, bound {3 * heartbeat:.1f} s):"
            f" {stop:.2f} s"
        )
    ms = asyncio.run(refusal_ms(args.model, 10 << 20))
    print(f"10 MB prompt -> prompt_too_long: {ms:.1f} ms")


if __name__ == "__main__":
    main()
