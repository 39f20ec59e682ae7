"""Bad input over a real socket: every bad frame gets a coded error; the worker keeps serving."""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import protocol as p

INVALID_DIR = Path(__file__).resolve().parents[1] / "protocol" / "vectors" / "invalid"
INVALID_VECTORS = json.loads((INVALID_DIR / "client_frames.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def raw(tinystories_worker: WorkerProcess):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(tinystories_worker.endpoint)
    yield sock
    sock.close()


def ask(sock: zmq.Socket, data: bytes) -> dict:
    sock.send(data)
    return msgpack.unpackb(sock.recv(), raw=False)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def gen(rid: str = "g", **fields: object) -> dict:
    return {"v": 1, "type": "generate", "id": rid, "prompt": "Once upon a time", **fields}


def assert_serves(sock: zmq.Socket) -> None:
    """A valid request still runs to its final chunk (and nothing else arrives meanwhile)."""
    sock.send(pack(gen("ok", params={"max_tokens": 5, "temperature": 0.0})))
    while True:
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert reply["type"] == "chunk" and reply["id"] == "ok", reply
        if "stats" in reply:
            assert reply["finish_reason"] in ("stop", "length")
            return


CASES = [
    ("random bytes", b"\xc1\xff\x00garbage", "bad_frame"),
    ("non-map msgpack", pack([1, 2, 3]), "bad_frame"),
    ("missing type", pack({"v": 1}), "unknown_type"),
    ("unknown type", pack({"v": 1, "type": "explode"}), "unknown_type"),
    ("unsupported version", pack({"v": 2, "type": "ping"}), "unsupported_version"),
    ("missing id", pack({"v": 1, "type": "generate", "prompt": "x"}), "invalid_request"),
    ("ill-typed prompt", pack(gen(prompt=17)), "invalid_request"),
    ("no prompt", pack({"v": 1, "type": "generate", "id": "x"}), "invalid_request"),
    ("two prompts", pack(gen(tokens=[1, 2])), "invalid_request"),
    ("negative max_tokens", pack(gen(params={"max_tokens": -1})), "invalid_parameters"),
    ("top_p 7", pack(gen(params={"top_p": 7})), "invalid_parameters"),
    ("NaN temperature", pack(gen(params={"temperature": float("nan")})), "invalid_parameters"),
    # The 2**70 case: msgpack cannot encode ints beyond 2**64-1, so uint64's maximum stands in.
    ("huge integer", pack(gen(params={"max_tokens": 2**64 - 1})), "invalid_parameters"),
    # A seed may be up to 2**64-1 (SPEC 6.1): that one is legal, see test_max_seed_is_accepted.
    ("top_k 2**63", pack(gen(params={"top_k": 2**63})), "invalid_parameters"),
    ("huge top_k", pack(gen(params={"top_k": 2**64 - 1})), "invalid_parameters"),
    (
        "huge repetition_context_size",
        pack(gen(params={"repetition_context_size": 2**64 - 1})),
        "invalid_parameters",
    ),
    ("huge stop token id", pack(gen(params={"stop_token_ids": [2**64 - 1]})), "invalid_parameters"),
    (
        "huge prompt token id",
        pack({"v": 1, "type": "generate", "id": "t", "tokens": [1, 2**64 - 1]}),
        "invalid_request",
    ),
    ("prompt too long", pack(gen(prompt="once upon a time " * 400)), "prompt_too_long"),
    (
        "token out of vocab",
        pack({"v": 1, "type": "generate", "id": "t", "tokens": [1, 10**6]}),
        "invalid_request",
    ),
]


@pytest.mark.parametrize("name,data,code", CASES, ids=[c[0] for c in CASES])
def test_bad_frame_gets_its_code(raw: zmq.Socket, name: str, data: bytes, code: str) -> None:
    reply = ask(raw, data)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    assert_serves(raw)


@pytest.mark.parametrize("case", INVALID_VECTORS, ids=[c["description"] for c in INVALID_VECTORS])
def test_invalid_vector_over_the_wire(raw: zmq.Socket, case: dict) -> None:
    """Every frame of protocol/vectors/invalid gets its code (and id, or none) from the worker."""
    reply = ask(raw, bytes.fromhex(case["msgpack_hex"]))
    assert reply["type"] == "error" and reply["code"] == case["code"], reply
    assert reply.get("id") == case["request_id"], reply  # null in the vector: no id (SPEC 11)
    assert reply["message"]
    assert_serves(raw)


def test_max_seed_is_accepted(raw: zmq.Socket) -> None:
    """seed's range is 0 ... 2**64-1: the largest one generates, reproducibly."""
    runs = []
    for _ in range(2):
        raw.send(pack(gen("s", params={"max_tokens": 8, "temperature": 1.0, "seed": 2**64 - 1})))
        tokens = []
        while True:
            reply = msgpack.unpackb(raw.recv(), raw=False)
            assert reply["type"] == "chunk" and reply["id"] == "s", reply
            tokens += reply["tokens"]
            if "stats" in reply:
                break
        assert reply["stats"]["generated_tokens"] == len(tokens) > 0
        runs.append(tokens)
    assert runs[0] == runs[1]
    assert_serves(raw)


def test_duplicate_active_id(raw: zmq.Socket) -> None:
    params = {"max_tokens": 300, "temperature": 0.0, "stop_on_eos": False}
    raw.send(pack(gen("dup", params=params)))
    raw.send(pack(gen("dup")))
    # A ping after the original's final chunk: frames to one client arrive in order, so
    # everything the worker sends for "dup" (a stray second terminal frame too) comes before it.
    frames = []
    pinged = False
    while True:
        reply = msgpack.unpackb(raw.recv(), raw=False)
        if reply["type"] == "pong":
            assert reply["id"] == "after-dup"
            break
        frames.append(reply)
        if reply["type"] == "chunk" and "stats" in reply and not pinged:
            raw.send(pack({"v": 1, "type": "ping", "id": "after-dup"}))
            pinged = True
    assert all(f["id"] == "dup" for f in frames), frames
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["code"] == "duplicate_id" and errors[0]["id"] == "dup", errors[0]
    terminal = [f for f in frames if f["type"] == "chunk" and "stats" in f]
    assert len(terminal) == 1, terminal  # exactly one terminal frame: the original's
    # The refused duplicate did not disturb the original: it ran to its full length.
    final = terminal[0]
    assert final["finish_reason"] == "length", final
    streamed = [t for f in frames if f["type"] == "chunk" for t in f["tokens"]]
    assert len(streamed) == final["stats"]["generated_tokens"] == 300
    assert_serves(raw)


def test_64_mib_message(raw: zmq.Socket) -> None:
    reply = ask(raw, pack(gen(prompt="x" * (64 << 20))))
    assert reply["code"] == "bad_frame"
    assert_serves(raw)


def test_fuzzed_frames_never_break_the_worker(raw: zmq.Socket) -> None:
    rng = random.Random(7)
    valid = [p.encode(p.Ping(id="z")), pack(gen(params={"max_tokens": 2, "temperature": 0.0}))]
    sent = 0
    for _ in range(3000):
        base = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(base))
            if op < 0.4:
                base[pos] = rng.randrange(256)
            elif op < 0.7:
                del base[pos]
            else:
                base.insert(pos, rng.randrange(256))
        frame = bytes(base)
        raw.send(frame)
        try:
            sent += not isinstance(p.decode_client(frame), p.Cancel)  # a cancel answers nothing
        except p.FrameError:
            sent += 1
    # Every frame is answered by something (error, pong, or a generation's frames).
    terminal = 0
    # Generous: a cold machine compiles a decode trace per new batch size (seconds each).
    raw.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        while terminal < sent:
            reply = msgpack.unpackb(raw.recv(), raw=False)
            if reply.get("type") in (
                "error",
                "pong",
                "welcome",
                "info",
                "tokenize",
                "detokenize",
                "render",
            ):
                terminal += 1
            elif reply.get("type") == "chunk" and "stats" in reply:
                terminal += 1
    except zmq.Again:
        pass
    raw.setsockopt(zmq.RCVTIMEO, 10_000)
    assert terminal == sent  # exactly one terminal frame per request
    assert_serves(raw)


def test_advertised_max_tokens_is_enforced(raw: zmq.Socket) -> None:
    # Uncapped: the protocol's own bound is advertised, and the context ends a long request.
    info = ask(raw, pack({"v": 1, "type": "info", "id": "i"}))
    assert info["limits"]["max_tokens"] == 2**31 - 1
    capped = WorkerProcess(TINYSTORIES, "--max-tokens-limit", "50")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        sock.connect(capped.endpoint)
        info = ask(sock, pack({"v": 1, "type": "info", "id": "i"}))
        assert info["limits"]["max_tokens"] == 50
        reply = ask(sock, pack(gen("over", params={"max_tokens": 51})))
        assert reply["type"] == "error" and reply["code"] == "invalid_parameters", reply
        assert_serves(sock)
    finally:
        sock.close()
        capped.stop()
