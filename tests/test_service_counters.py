"""The worker's send path and service counters: byte-exact chunks, pacing, info."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import msgpack
import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import AsyncClient
from ffai_client import protocol as p
from ffai_client.types import GenerationChunk, GenerationParameters, GenerationStats
from ffai_worker.engine import Engine

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
    assert after.service_cpu_s > before.service_cpu_s


def test_pacing_coalesces_tokens_and_keeps_text_exact() -> None:
    # A 10-minute interval: whatever the machine's speed, everything between the
    # first token (never held) and the final chunk (never held) is one frame.
    worker = WorkerProcess(TINYSTORIES, "--stream-interval-ms", "600000")
    params = GenerationParameters(temperature=0.0, max_tokens=120, stop_on_eos=False)

    async def run() -> list[GenerationChunk]:
        async with AsyncClient(worker.endpoint) as client:
            return [c async for c in client.generate_stream("Hello", parameters=params)]

    try:
        chunks = asyncio.run(run())
    finally:
        worker.stop()
    engine = Engine.load(TINYSTORIES)
    expected = engine.generate("Hello", parameters=params)
    assert [len(c.tokens) for c in chunks] == [1, 119, 0]
    assert chunks[-1].is_final and chunks[-1].finish_reason == "length"
    assert [t for c in chunks for t in c.tokens] == expected.generated_tokens
    assert "".join(c.text for c in chunks) == expected.text
    assert chunks[1].position == chunks[2].position == expected.stats.prompt_tokens + 120
