"""The waiting queue over the wire: one slot, one queue place, `busy` beyond, cancel frees a place.

A real worker (`--max-batch 1 --max-queue 1`) and real sockets: a raw DEALER for the
requests whose every frame is counted, and an `AsyncClient` for the refused one and `info`.
Only protocol facts are asserted; the timeouts are safety nets against a hang.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from conftest import WorkerProcess

from ffai_client import AsyncClient, Busy
from ffai_client.types import GenerationParameters

SAFETY_S = 60.0  # a cold machine compiles kernels on first use; never reached otherwise
# A runs until cancelled: far more tokens than the test needs (the context is 16k).
ENDLESS = {"max_tokens": 15000, "temperature": 0.0, "stop_on_eos": False}
SHORT = {"max_tokens": 8, "temperature": 0.0, "stop_on_eos": False}


@pytest.fixture
def queue_worker(slow_model: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(slow_model, "--max-batch", "1", "--max-queue", "1")
    yield worker
    worker.stop()


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def gen(rid: str, params: dict[str, Any]) -> bytes:
    frame = {"v": 1, "type": "generate", "id": rid, "prompt": "Once upon a time", "params": params}
    return pack(frame)


def is_terminal(frame: dict[str, Any]) -> bool:
    return frame["type"] == "error" or (frame["type"] == "chunk" and "stats" in frame)


class Raw:
    """A raw DEALER that keeps every frame it receives, grouped by request id."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.frames: dict[str | None, list[dict[str, Any]]] = defaultdict(list)

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def until(self, stop: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Receive (and keep) frames until one satisfies `stop`; return it."""
        while True:
            data = await asyncio.wait_for(self.sock.recv(), SAFETY_S)
            frame = msgpack.unpackb(data, raw=False)
            self.frames[frame.get("id")].append(frame)
            if stop(frame):
                return frame

    async def info(self, rid: str) -> dict[str, Any]:
        await self.send(pack({"v": 1, "type": "info", "id": rid}))
        return await self.until(lambda f: f["type"] == "info" and f["id"] == rid)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


async def queue_scenario(endpoint: str) -> None:
    raw = Raw(endpoint)
    try:
        # A takes the only slot: its first token has been streamed.
        await raw.send(gen("A", ENDLESS))
        first = await raw.until(lambda f: f["id"] == "A")
        assert first["type"] == "chunk" and "stats" not in first and first["tokens"], first

        # B takes the only queue place. Frames of one client are handled in order, so the
        # info reply already counts B (and shows the worker's advertised limits).
        await raw.send(gen("B", ENDLESS))
        info = await raw.info("i-queued")
        assert info["limits"]["max_batch"] == 1 and info["limits"]["max_queue"] == 1, info
        assert (info["running"], info["waiting"]) == (1, 1), info
        assert raw.frames["B"] == []  # accepted and waiting: no error, no chunk

        async with AsyncClient(endpoint, timeout=SAFETY_S) as client:
            # C finds the queue full: refused at once with `busy`, never queued.
            with pytest.raises(Busy) as refused:
                await asyncio.wait_for(
                    client.generate(
                        "Once upon a time",
                        parameters=GenerationParameters(**SHORT),
                        request_id="C",
                    ),
                    SAFETY_S,
                )
            assert refused.value.code == "busy" and refused.value.request_id == "C"
            after_busy = await client.info()
            assert (after_busy.running, after_busy.waiting) == (1, 1), after_busy

            # Cancelling the waiting B ends it at once with one `cancelled` final chunk and
            # no tokens: it never ran.
            await raw.send(pack({"v": 1, "type": "cancel", "id": "B"}))
            b_final = await raw.until(lambda f: f["id"] == "B")
            assert b_final["type"] == "chunk" and b_final["finish_reason"] == "cancelled", b_final
            assert b_final["tokens"] == [] and b_final["stats"]["generated_tokens"] == 0, b_final

            # B's place is free again: D is accepted (no `busy` before the info reply) and waits.
            await raw.send(gen("D", SHORT))
            info = await raw.info("i-requeued")
            assert raw.frames["D"] == [], raw.frames["D"]
            assert (info["running"], info["waiting"]) == (1, 1), info

            # Cancelling A (still running: it ends `cancelled`, not `length`) lets D run to the end.
            await raw.send(pack({"v": 1, "type": "cancel", "id": "A"}))
            a_final = await raw.until(lambda f: f["id"] == "A" and is_terminal(f))
            assert a_final["type"] == "chunk" and a_final["finish_reason"] == "cancelled", a_final
            d_final = await raw.until(lambda f: f["id"] == "D" and is_terminal(f))
            assert d_final["type"] == "chunk" and d_final["finish_reason"] == "length", d_final
            d_tokens = [t for f in raw.frames["D"] for t in f["tokens"]]
            assert len(d_tokens) == d_final["stats"]["generated_tokens"] == SHORT["max_tokens"]

            idle = await client.info()
            assert (idle.running, idle.waiting) == (0, 0), idle

        # Everything the worker sends this client comes before the pong: exactly one terminal
        # frame per request, and not a single error on this socket.
        await raw.send(pack({"v": 1, "type": "ping", "id": "last"}))
        await raw.until(lambda f: f["type"] == "pong" and f["id"] == "last")
        for rid in ("A", "B", "D"):
            terminal = [f for f in raw.frames[rid] if is_terminal(f)]
            assert len(terminal) == 1, (rid, terminal)
            assert terminal[-1] is raw.frames[rid][-1], (rid, raw.frames[rid][-1])
        errors = [f for fs in raw.frames.values() for f in fs if f["type"] == "error"]
        assert errors == []
        assert set(raw.frames) == {"A", "B", "D", "i-queued", "i-requeued", "last"}
    finally:
        raw.close()


def test_full_queue_is_busy_and_a_cancelled_waiter_frees_its_place(
    queue_worker: WorkerProcess,
) -> None:
    asyncio.run(queue_scenario(queue_worker.endpoint))
