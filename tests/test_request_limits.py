"""Bounded work per request (DESIGN invariant 10) against real worker processes.

A copy of tinystories-260k carries a hostile chat template: it picks one attack by
the first message's text (so one worker serves every case) and renders normally
otherwise. Each attack must end with `template_error` within the worker's template
budget while another client's streams keep flowing; 10 MB prompts and messages are
refused with `prompt_too_long` before tokenizing; the worker serves on afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import TINYSTORIES, TOKENIZERS, WorkerProcess

from ffai_client import AsyncClient, ChatMessage, GenerationParameters, PromptTooLong, TemplateError
from ffai_worker.text.tokenizer import Tokenizer

BUDGET_S = 1.0  # EngineConfig.template_budget_s, the worker's default
SLACK_S = 4.0  # a loaded 2-core machine: the point is "ends", not "ends fast"
QUICK_S = 1.0  # "refused in milliseconds", generously
SAFETY_S = 60.0
STORY = "Once upon a time"
STREAM = GenerationParameters(temperature=0.0, max_tokens=120, stop_on_eos=False)
SHORT = GenerationParameters(temperature=0.0, max_tokens=4, stop_on_eos=False)
SHORT_STREAM = GenerationParameters(temperature=0.0, max_tokens=40, stop_on_eos=False)
TEN_MB = "Lily and Ben played in the park. " * 320_000

# Attacks that run until the deadline stops them, and ones refused before they run.
ENDLESS = {
    "nested_loops": "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}"
    "{% endfor %}",
    "nested_empty_loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
    "{% endfor %}",
}
HUGE = {
    "power": "{{ 9**(9**9) }}",
    "lipsum": "{{ lipsum(n=1000000) }}",
    "repeat": "{{ 'a' * 10**9 }}",
    "doubling": "{% set s = namespace(v='a') %}{% for i in range(64) %}"
    "{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
    "deep_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}
# A legitimate but slow render (~0.1-0.5 s): long enough to cancel or vanish during it.
SLOW = "{% for i in range(30000) %}{% for j in range(3) %}{% endfor %}{% endfor %}"


def hostile_template(normal: str) -> str:
    branches = {**ENDLESS, **HUGE, "slow": SLOW + normal}
    parts = [
        f"{'if' if i == 0 else 'elif'} messages[0]['content'] == {name!r} %}}{body}{{% "
        for i, (name, body) in enumerate(branches.items())
    ]
    return "{% " + "".join(parts) + "else %}" + normal + "{% endif %}"


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile-tinystories")
    for f in TINYSTORIES.iterdir():
        if f.name != "chat_template.jinja":  # it would win over tokenizer_config's template
            shutil.copy(f, folder / f.name)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    normal = (TINYSTORIES / "chat_template.jinja").read_text()
    config["chat_template"] = hostile_template(normal)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hostile_worker(hostile_folder: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(hostile_folder, "--max-batch", "4")
    yield worker
    worker.stop()


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


async def stream_until(
    client: AsyncClient,
    done: asyncio.Event,
    arrivals: list[float],
    params: GenerationParameters = STREAM,
) -> int:
    """Run one greedy stream again and again until `done`; every run must be the same."""
    expected = (await client.generate(STORY, parameters=params)).generated_tokens
    runs = 0
    while not done.is_set():
        tokens: list[int] = []
        async for chunk in client.generate_stream(STORY, parameters=params):
            arrivals.append(time.monotonic())
            tokens.extend(chunk.tokens)
        assert tokens == expected
        runs += 1
    return runs


def gaps_during(arrivals: list[float], start: float, end: float) -> tuple[int, float]:
    """How many chunks arrived in (start, end), and the longest wait without one."""
    during = [t for t in arrivals if start < t < end]
    times = [start, *during, end]
    return len(during), max(b - a for a, b in itertools.pairwise(times))


async def attack_while_streaming(endpoint: str, name: str) -> dict[str, Any]:
    async with (
        AsyncClient(endpoint, timeout=SAFETY_S) as streamer,
        AsyncClient(endpoint, timeout=SAFETY_S) as attacker,
    ):
        done, arrivals = asyncio.Event(), []
        streaming = asyncio.create_task(stream_until(streamer, done, arrivals))
        while not arrivals:
            await asyncio.sleep(0.005)
        start = time.monotonic()
        try:
            await attacker.generate(messages=user(name), parameters=SHORT)
        except TemplateError as exc:
            error: TemplateError | None = exc
        else:
            error = None
        end = time.monotonic()
        done.set()
        runs = await asyncio.wait_for(streaming, SAFETY_S)
        with pytest.raises(TemplateError) as rendered:
            await attacker.render(user(name))
        # The worker still serves the attacker itself, with the same template.
        fine = await attacker.generate(messages=user("Tell me a story"), parameters=SHORT)
    chunks_during, max_gap = gaps_during(arrivals, start, end)
    return {
        "error": error,
        "seconds": end - start,
        "runs": runs,
        "chunks_during": chunks_during,
        "max_gap": max_gap,
        "render_code": rendered.value.code,
        "fine": fine,
    }


@pytest.mark.parametrize("name", sorted(ENDLESS) + sorted(HUGE))
def test_hostile_template_ends_while_others_stream(
    hostile_worker: WorkerProcess, name: str
) -> None:
    out = asyncio.run(attack_while_streaming(hostile_worker.endpoint, name))
    assert out["error"] is not None and out["error"].code == "template_error", out
    assert out["render_code"] == "template_error"
    assert out["fine"].finish_reason == "length" and len(out["fine"].generated_tokens) == 4
    assert out["runs"] >= 1  # every stream run beside the attack came out exact
    if name in ENDLESS:
        assert "budget" in out["error"].message  # its time, or its output size, ran out
        assert out["seconds"] < BUDGET_S + SLACK_S, out
        # The other client's stream flowed through the whole render: never frozen.
        assert out["chunks_during"] >= 3, out
        assert out["max_gap"] < out["seconds"] / 2, out
    else:
        assert out["seconds"] < QUICK_S + SLACK_S, out


async def refuse_big_inputs(endpoint: str) -> dict[str, float]:
    seconds = {}
    async with AsyncClient(endpoint, timeout=SAFETY_S) as client:
        await client.info()  # connected and warm: only the refusal is timed
        cases = {
            "prompt": lambda: client.generate(TEN_MB, parameters=SHORT),
            "message": lambda: client.generate(messages=user(TEN_MB), parameters=SHORT),
            "render": lambda: client.render(user(TEN_MB)),
            "parts": lambda: client.render(
                [ChatMessage("user", [{"type": "text", "text": TEN_MB}])]
            ),
        }
        for case, call in cases.items():
            start = time.monotonic()
            with pytest.raises(PromptTooLong) as refused:
                await call()
            seconds[case] = time.monotonic() - start
            assert refused.value.code == "prompt_too_long"
            assert "UTF-8 bytes" in refused.value.message
        result = await client.generate(STORY, parameters=SHORT)
        assert len(result.generated_tokens) == 4
    return seconds


def test_ten_megabyte_prompt_and_message_are_refused_at_once(
    hostile_worker: WorkerProcess,
) -> None:
    seconds = asyncio.run(refuse_big_inputs(hostile_worker.endpoint))
    assert all(s < QUICK_S for s in seconds.values()), seconds


def raw_frames(sock: zmq.Socket, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    frames = []
    while True:
        assert sock.poll(int(SAFETY_S * 1000)), frames
        frame = msgpack.unpackb(sock.recv(), raw=False)
        frames.append(frame)
        if until(frame):
            return frames


def test_cancel_during_preparation_ends_with_one_final_chunk(
    hostile_worker: WorkerProcess,
) -> None:
    """Cancel a generate whose template is still rendering: exactly one terminal frame."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(hostile_worker.endpoint)
    slow = [{"role": "user", "content": "slow"}]
    try:
        sock.send(msgpack.packb({"v": 1, "type": "generate", "id": "g", "messages": slow}))
        sock.send(msgpack.packb({"v": 1, "type": "cancel", "id": "g"}))
        sock.send(msgpack.packb({"v": 1, "type": "info", "id": "i"}))
        frames = raw_frames(sock, lambda f: f.get("id") == "g")
        # Frames of one client keep their order: the info reply counts the admitted request.
        assert [f["type"] for f in frames] == ["info", "chunk"], frames
        assert frames[0]["waiting"] + frames[0]["running"] == 1, frames[0]
        sock.send(msgpack.packb({"v": 1, "type": "ping", "id": "p"}))
        frames += raw_frames(sock, lambda f: f.get("id") == "p")
    finally:
        sock.close()
    mine = [f for f in frames if f.get("id") == "g"]
    assert len(mine) == 1, frames
    assert mine[0]["type"] == "chunk" and mine[0]["finish_reason"] == "cancelled", mine
    assert mine[0]["tokens"] == [] and mine[0]["stats"]["generated_tokens"] == 0


def held_pings(endpoint: str) -> list[dict[str, Any]]:
    """A slow generate, then 1100 pings at once; every frame the worker answers."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    slow = [{"role": "user", "content": "slow"}]
    gen = {"v": 1, "type": "generate", "id": "g", "messages": slow, "params": {"max_tokens": 2}}
    pings = [msgpack.packb({"v": 1, "type": "ping", "id": f"p{i}"}) for i in range(1100)]
    answered: set[str] = set()

    def all_answered(frame: dict[str, Any]) -> bool:
        answered.add(frame["id"] if frame["type"] != "chunk" or "stats" in frame else "")
        return len(answered - {""}) == 1101

    try:
        sock.send(msgpack.packb(gen))
        for ping in pings:
            sock.send(ping)
        return raw_frames(sock, all_answered)
    finally:
        sock.close()


def test_frames_beyond_the_wait_bound_are_busy(hostile_folder: Path) -> None:
    """1100 pings behind a request being prepared: 1024 wait and are answered in order,
    the rest get `busy` at once; every frame gets exactly one answer.

    The case needs the worker to *read* all 1100 pings while the ~0.12 s render runs.
    It reads at most 256 frames a tick, and the render holds the GIL (pure-Python
    Jinja), so some runs get only one or two ticks in: 255 or 511 pings are held, the
    rest are read after the preparation and answered normally, in order, none over the
    bound (found with worker-side prints; it predates #16). That run is correct but not
    the case under test: it is checked for one in-order answer per frame and the
    scenario is tried again on a new worker, at most four times."""
    for _ in range(4):
        worker = WorkerProcess(hostile_folder, "--max-batch", "4")
        try:
            frames = held_pings(worker.endpoint)
        finally:
            worker.stop()
        busy = [f["id"] for f in frames if f["type"] == "error"]
        pongs = [f["id"] for f in frames if f["type"] == "pong"]
        assert [f["stats"]["generated_tokens"] for f in frames if "stats" in f] == [2]
        assert sorted(busy + pongs) == sorted(f"p{i}" for i in range(1100))
        if len(busy) == 1100 - 1024:
            break
        # Not all read in time: the first 1024 held at most, any refused ones next.
        assert busy == [f"p{i}" for i in range(1024, 1024 + len(busy))]
        assert pongs == [f"p{i}" for i in range(1100) if f"p{i}" not in busy]
    assert all(f["code"] == "busy" for f in frames if f["type"] == "error")
    assert len(busy) == 1100 - 1024 and len(pongs) == 1024, (len(busy), len(pongs))
    assert pongs == [f"p{i}" for i in range(1024)]  # held frames keep their order


async def vanish_during_preparation(endpoint: str) -> None:
    for _ in range(3):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        msg = {
            "v": 1,
            "type": "generate",
            "id": "v",
            "messages": [{"role": "user", "content": "slow"}],
        }
        sock.send(msgpack.packb(msg))
        await asyncio.sleep(0.05)
        sock.close()  # gone while its template renders
    async with AsyncClient(endpoint, timeout=SAFETY_S) as client:
        result = await client.generate(messages=user("slow"), parameters=SHORT)
        assert len(result.generated_tokens) == 4
        deadline = time.monotonic() + SAFETY_S
        while True:  # the vanished clients' requests never linger
            info = await client.info()
            if (info.running, info.waiting) == (0, 0):
                break
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.1)


def test_client_vanishing_during_preparation_leaves_nothing_behind(
    hostile_worker: WorkerProcess,
) -> None:
    asyncio.run(vanish_during_preparation(hostile_worker.endpoint))


# -- tokenizing a long prompt off the actor thread ---------------------------------------------
async def long_prompt_while_streaming(endpoint: str, prompt: str) -> dict[str, Any]:
    async with (
        AsyncClient(endpoint, timeout=SAFETY_S) as streamer,
        AsyncClient(endpoint, timeout=SAFETY_S) as sender,
    ):
        done, arrivals = asyncio.Event(), []
        streaming = asyncio.create_task(stream_until(streamer, done, arrivals, SHORT_STREAM))
        while not arrivals:
            await asyncio.sleep(0.005)
        start = time.monotonic()
        with pytest.raises(PromptTooLong):
            await sender.generate(prompt, parameters=SHORT)
        end = time.monotonic()
        done.set()
        await asyncio.wait_for(streaming, SAFETY_S)
    chunks_during, max_gap = gaps_during(arrivals, start, end)
    return {"seconds": end - start, "chunks_during": chunks_during, "max_gap": max_gap}


def test_tokenizing_a_long_prompt_never_freezes_other_streams(slow_model: Path) -> None:
    """1 MB of text fits the byte bound (16383 tokens x 256 bytes) so it is tokenized,
    off the actor thread, then refused for its token count; meanwhile streams flow."""
    worker = WorkerProcess(slow_model, "--max-batch", "4")
    try:
        prompt = TEN_MB[:1_000_000]
        out = asyncio.run(long_prompt_while_streaming(worker.endpoint, prompt))
    finally:
        worker.stop()
    assert out["chunks_during"] >= 3, out
    assert out["max_gap"] < out["seconds"] / 2, out


# -- the byte bound is sound -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tinystories", "llama3", "qwen2.5", "deepseek-v4"])
def test_no_text_packs_more_bytes_per_token_than_the_bound(name: str) -> None:
    """The densest text there is (the tokens spelling the most bytes, repeated) stays in bound."""
    folder = TINYSTORIES if name == "tinystories" else TOKENIZERS / name
    tok = Tokenizer.from_folder(folder)
    bound = tok.max_token_bytes
    assert bound is not None and bound >= 4
    ids = list(range(tok.vocab_size))
    texts = tok.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    sizes = [len(t.encode("utf-8")) for t in texts]
    densest = sorted(ids, key=sizes.__getitem__, reverse=True)[:50]
    assert sizes[densest[0]] <= bound  # no single token spells more than the bound
    for i in densest:
        text = texts[i] * 40
        count = len(tok.encode(text, add_special_tokens=False))
        assert len(text.encode("utf-8")) <= bound * count, (texts[i], count)
