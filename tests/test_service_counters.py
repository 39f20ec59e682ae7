"""The worker's send fast path and service counters: byte-exact chunks, coalescing, info."""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from collections import deque
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import WorkerProcess

from ffai_client import AsyncClient
from ffai_client import protocol as p
from ffai_client.types import GenerationChunk, GenerationParameters, GenerationStats

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"

CHUNKS = [
    GenerationChunk(text=" there", tokens=[612], position=6),
    GenerationChunk(text="é🙂‍", tokens=[5, 6, 7], position=9),
    GenerationChunk(text="", tokens=[], position=0),
    GenerationChunk(
        text="", tokens=[], position=9, stats=GenerationStats(prompt_tokens=4), finish_reason="stop"
    ),
    GenerationChunk(
        text="",
        tokens=[],
        position=30,
        stats=GenerationStats(prompt_tokens=4, generated_tokens=26, steady_tokens_per_second=9.5),
        finish_reason="length",
    ),
]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_encode_chunk_is_the_canonical_encoding(chunk: GenerationChunk) -> None:
    wire = p.Chunk.from_generation_chunk("req-1", chunk)
    expected = msgpack.packb(p.to_wire(wire), use_bin_type=True)
    assert p.encode_chunk("req-1", chunk) == p.encode(wire) == expected
    assert p.decode_worker(p.encode_chunk("req-1", chunk)) == wire


def test_reused_packers_are_per_thread() -> None:
    failures: list[str] = []

    def work(n: int) -> None:
        for i in range(300):
            chunk = GenerationChunk(text=f"t{n}-{i}", tokens=[n, i], position=i)
            data = p.encode_chunk(f"id-{n}", chunk)
            if msgpack.unpackb(data)["text"] != f"t{n}-{i}":
                failures.append(f"{n}/{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    with pytest.raises(TypeError):
        p.encode(p.Error(code="x", message=object()))  # type: ignore[arg-type]
    assert p.encode(p.Ping(id="p1")).hex() == "83a17601a474797065a470696e67a26964a27031"


def test_info_counters_are_optional() -> None:
    old = json.loads((VECTORS / "w2c_info.json").read_text("utf-8"))
    reply = p.decode_worker(bytes.fromhex(old["msgpack_hex"]))
    assert isinstance(reply, p.InfoReply)
    assert reply.frames_sent is None and reply.service_cpu_s is None
    new = json.loads((VECTORS / "w2c_info_counters.json").read_text("utf-8"))
    reply = p.decode_worker(bytes.fromhex(new["msgpack_hex"]))
    assert isinstance(reply, p.InfoReply)
    assert reply.frames_sent == 70000 and reply.service_cpu_s == 1.5
    as_int = dict(new["value"], service_cpu_s=2)  # decoders accept an int where a float goes
    reply = p.decode_worker(msgpack.packb(as_int))
    assert isinstance(reply, p.InfoReply) and type(reply.service_cpu_s) is float
    for bad in ({"frames_sent": -1}, {"frames_sent": 1.5}, {"service_cpu_s": float("nan")}):
        with pytest.raises(p.FrameError):
            p.decode_worker(msgpack.packb(dict(new["value"], **bad)))


# -- the worker's send path, with a scripted socket ---------------------------------------------


class FakeSocket:
    """Records what the worker sends; `mode` makes sends succeed, fill up or find no peer."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self._identity: bytes | None = None

    def send(self, data: bytes, flags: int = 0) -> None:
        if self._identity is None:  # the routing-id part
            if self.mode == "full":
                raise zmq.Again()
            if self.mode == "gone":
                raise zmq.ZMQError(errno.EHOSTUNREACH)
            assert flags & zmq.SNDMORE
            self._identity = data
            return
        identity, self._identity = self._identity, None
        self.sent.append((identity, msgpack.unpackb(data)))


class FakeEngine:
    def __init__(self) -> None:
        self.cancelled: list[Hashable] = []

    def cancel(self, key: Hashable) -> bool:
        self.cancelled.append(key)
        return True


@pytest.fixture
def worker() -> Iterator[Any]:
    from ffai_worker.server import ServerConfig, Worker

    w = Worker(FakeEngine(), ServerConfig(endpoint="ipc:///nonexistent/unused.sock"))  # type: ignore[arg-type]
    real, w.sock = w.sock, FakeSocket()  # type: ignore[assignment]
    w._live[b"c1"] = {"a", "b"}
    yield w
    real.close(linger=0)


def _outbox(*chunks: GenerationChunk) -> deque[GenerationChunk]:
    return deque(chunks)


FINAL = GenerationChunk(
    text="", tokens=[], position=4, stats=GenerationStats(prompt_tokens=1), finish_reason="length"
)


def test_chunks_go_out_at_once(worker: Any) -> None:
    worker._emit((b"c1", "a"), _outbox(GenerationChunk(text="x", tokens=[1], position=2)))
    assert worker.frames_sent == 1 and not worker._pending
    outbox = _outbox(GenerationChunk(text="y", tokens=[2], position=3), FINAL)
    worker._emit((b"c1", "a"), outbox)
    assert not outbox and worker.frames_sent == 3 and not worker._pending
    assert [m["text"] for _, m in worker.sock.sent] == ["x", "y", ""]
    assert worker.sock.sent[-1][1]["finish_reason"] == "length"
    assert worker._live[b"c1"] == {"b"}  # the terminal frame ends the request


def test_a_full_pipe_coalesces_until_the_client_reads(worker: Any) -> None:
    key = (b"c1", "a")
    worker.sock.mode = "full"
    for i in range(3):
        worker._emit(key, _outbox(GenerationChunk(text=f"t{i}", tokens=[i], position=10 + i)))
    worker._emit(key, _outbox(FINAL))
    worker._flush_pending()
    assert worker.sock.sent == [] and worker.frames_sent == 0
    assert len(worker._pending[key]) == 2  # one coalesced chunk, then the final one
    worker.sock.mode = "ok"
    worker._flush_pending()
    frames = [m for _, m in worker.sock.sent]
    assert [(m["text"], m["tokens"], m["position"]) for m in frames[:1]] == [
        ("t0t1t2", [0, 1, 2], 12)
    ]
    assert frames[1]["finish_reason"] == "length" and len(frames) == 2
    assert not worker._pending and worker._live[b"c1"] == {"b"}
    # With nothing pending any more, the next request's chunks go out directly again.
    worker._emit((b"c1", "b"), _outbox(GenerationChunk(text="z", tokens=[9], position=1)))
    assert worker.sock.sent[-1][1]["text"] == "z" and not worker._pending


def test_a_vanished_client_is_cancelled(worker: Any) -> None:
    worker.sock.mode = "gone"
    outbox = _outbox(GenerationChunk(text="x", tokens=[1], position=2), FINAL)
    worker._emit((b"c1", "a"), outbox)
    assert not outbox and not worker._pending and b"c1" not in worker._live
    assert sorted(worker.engine.cancelled) == [(b"c1", "a"), (b"c1", "b")]
    # Later output for that client is dropped without a send.
    worker.sock.mode = "ok"
    worker._emit((b"c1", "b"), _outbox(GenerationChunk(text="y", tokens=[2], position=3)))
    assert worker.sock.sent == [] and not worker._pending


# -- a real worker -------------------------------------------------------------------------------


def test_info_reports_service_counters(tinystories_worker: WorkerProcess) -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=40, stop_on_eos=False)

    async def run() -> tuple[p.InfoReply, p.InfoReply, int]:
        async with AsyncClient(tinystories_worker.endpoint) as client:
            before = await client.info()
            chunks = [
                c async for c in client.generate_stream("Once upon a time", parameters=params)
            ]
            after = await client.info()
        return before, after, len(chunks)

    before, after, chunks = asyncio.run(run())
    assert before.frames_sent is not None and after.frames_sent is not None
    assert before.service_cpu_s is not None and after.service_cpu_s is not None
    # The chunks plus the first info reply went out in between.
    assert after.frames_sent - before.frames_sent == chunks + 1
    assert 0 < after.service_cpu_s - before.service_cpu_s < 1.0
