"""`ffai batch`, end to end: a real worker, the real CLI in a subprocess, real files.

Greedy results must equal `AsyncClient.generate` for the same requests; bad
lines become error lines naming their line; a run killed (SIGKILL), a run
interrupted (SIGINT) and a run whose worker dies all leave a file that the
same command completes, with exactly one line per custom_id.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import AsyncClient, ChatMessage, GenerationParameters, GenerationResult
from ffai_client.batch import BatchInputError, BatchProgress, in_flight_window, run_batch
from ffai_client.messages import Limits

NAMES = ["Lily", "Ben", "Tom", "Sue", "a cat", "the dog", "Max", "Mia", "a bird", "Sam"]


def completion(cid: str, prompt: Any, max_tokens: int = 24, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **body},
    }


def chat(cid: str, content: str, max_tokens: int = 24, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **body},
    }


def many(count: int, max_tokens: int) -> list[dict[str, Any]]:
    return [
        completion(f"r{i}", f"Once upon a time, {NAMES[i % 10]} saw {i}", max_tokens)
        for i in range(count)
    ]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r for r in records}


def cli(endpoint: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ffai_client.cli", "batch", *args, "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(endpoint: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ffai_client.cli", "batch", *args, "--endpoint", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_lines(path: Path, count: int, proc: subprocess.Popen[str], limit: float = 60) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        lines = path.read_bytes().count(b"\n") if path.exists() else 0
        if lines >= count:
            return lines
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise TimeoutError(f"fewer than {count} lines in {path}")


def reference(endpoint: str, requests: list[dict[str, Any]]) -> dict[str, GenerationResult]:
    """Each single-prompt request straight through AsyncClient.generate: the oracle."""

    async def one(client: AsyncClient, req: dict[str, Any]) -> GenerationResult:
        async with room:  # within the worker's queue: the oracle must never be refused
            return await generate(client, req["body"])

    async def generate(client: AsyncClient, body: dict[str, Any]) -> GenerationResult:
        params = GenerationParameters(
            max_tokens=body["max_tokens"], temperature=0, stop=body.get("stop", [])
        )
        if "messages" in body:
            msgs = [ChatMessage.from_dict(m) for m in body["messages"]]
            return await client.generate(messages=msgs, parameters=params)
        return await client.generate(body["prompt"], parameters=params)

    room = asyncio.Semaphore(16)

    async def run() -> dict[str, GenerationResult]:
        async with AsyncClient(endpoint) as client:
            results = await asyncio.gather(*(one(client, r) for r in requests))
        return {r["custom_id"]: res for r, res in zip(requests, results, strict=True)}

    return asyncio.run(run())


def choice_text(record: dict[str, Any], index: int = 0) -> str:
    choice = record["response"]["body"]["choices"][index]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def assert_matches(record: dict[str, Any], expected: GenerationResult) -> None:
    assert record["error"] is None, record
    body = record["response"]["body"]
    assert record["response"]["status_code"] == 200
    assert choice_text(record) == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == expected.stats.generated_tokens
    assert body["usage"]["prompt_tokens"] == expected.stats.prompt_tokens


def test_results_equal_async_client(tinystories_worker: WorkerProcess, tmp_path: Path) -> None:
    singles = [
        *many(12, 32),
        completion("stop", "Once upon a time, Lily", 40, stop=["."]),
        chat("chat", "Tell me about a dog."),
    ]
    requests = [
        *singles,
        completion("n2", "Once upon a time, Ben", 16, n=2),
        completion("two-prompts", ["Once upon a time, Lily", "The dog ran"], 16),
    ]
    out = tmp_path / "out.jsonl"
    summary = run_batch(
        write_jsonl(tmp_path / "in.jsonl", requests), out, endpoint=tinystories_worker.endpoint
    )
    records = by_id(read_jsonl(out))
    assert len(read_jsonl(out)) == len(records) == len(requests)
    expected = reference(tinystories_worker.endpoint, singles)
    for cid, result in expected.items():
        assert_matches(records[cid], result)
    assert records["chat"]["response"]["body"]["object"] == "chat.completion"
    assert records["r0"]["response"]["body"]["object"] == "text_completion"
    assert records["r0"]["response"]["body"]["model"] == "tinystories-260k"
    # n=2 greedy: two identical choices; usage counts the prompt once, both completions.
    pair = reference(tinystories_worker.endpoint, [completion("x", "Once upon a time, Ben", 16)])
    n2 = records["n2"]
    assert [choice_text(n2, 0), choice_text(n2, 1)] == [pair["x"].text] * 2
    usage = n2["response"]["body"]["usage"]
    assert usage["prompt_tokens"] == pair["x"].stats.prompt_tokens
    assert usage["completion_tokens"] == 2 * pair["x"].stats.generated_tokens
    assert len(records["two-prompts"]["response"]["body"]["choices"]) == 2
    assert summary.ok == len(requests) and summary.failed == 0
    assert summary.completion_tokens == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in records.values()
    )


def test_bad_lines_become_error_lines(tinystories_worker: WorkerProcess, tmp_path: Path) -> None:
    lines: list[Any] = [
        completion("good1", "Once upon a time", 8),
        "{not json",  # 2
        "[1, 2]",  # 3
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},  # 4
        {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}},  # 5
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}},  # 6
        {"custom_id": "nobody", "method": "POST", "url": "/v1/completions", "body": "x"},  # 7
        completion("hot", "x", temperature="hot"),  # 8
        completion("many", "x", n=99),  # 9
        chat("nomsg", "x", messages=[]),  # 10
        completion("audio", "x", audio={"voice": "x"}),  # 11
        completion("stream", "x", stream=True),  # 12
        completion("model", "x", model="gpt-4o-mini"),  # 13
        completion("long", "Once upon a time " * 300, 8),  # 14: too long for the worker
        completion("good2", "The dog", 8),  # 15
    ]
    out = tmp_path / "out.jsonl"
    proc = cli(
        tinystories_worker.endpoint, str(write_jsonl(tmp_path / "in.jsonl", lines)), "-o", str(out)
    )
    assert proc.returncode == 1, proc.stderr
    assert "13 requests failed" in proc.stderr
    records = read_jsonl(out)
    assert len(records) == len(lines)
    errors = {r["error"]["line"]: r for r in records if r["error"] is not None}
    expected = {
        2: ("invalid_json", 400, None),
        3: ("invalid_json", 400, None),
        4: ("invalid_custom_id", 400, None),
        5: ("invalid_method", 405, "get"),
        6: ("invalid_url", 404, "emb"),
        7: ("invalid_body", 400, "nobody"),
        8: ("invalid_value", 400, "hot"),
        9: ("invalid_value", 400, "many"),
        10: ("missing_required_parameter", 400, "nomsg"),
        11: ("unsupported_parameter", 400, "audio"),
        12: ("invalid_value", 400, "stream"),
        13: ("model_not_found", 404, "model"),
        14: ("context_length_exceeded", 400, "long"),
    }
    assert sorted(errors) == sorted(expected)
    for line, (code, status, cid) in expected.items():
        record = errors[line]
        assert record["error"]["code"] == code, record
        assert record["custom_id"] == cid
        assert record["response"]["status_code"] == status
        assert record["response"]["body"]["error"]["code"] == code
        if line != 14:  # found before sending: the message names the line
            assert record["error"]["message"].startswith(f"line {line}: "), record
    assert errors[8]["response"]["body"]["error"]["param"] == "temperature"
    assert errors[14]["response"]["body"]["error"]["param"] == "prompt"
    ok = [r for r in records if r["error"] is None]
    assert sorted(r["custom_id"] for r in ok) == ["good1", "good2"]
    # Rerun: nothing runs again, bad lines without a custom_id included (known by line number).
    again = cli(tinystories_worker.endpoint, str(tmp_path / "in.jsonl"), "-o", str(out))
    assert again.returncode == 1
    assert "0 requests to run" in again.stderr
    assert len(read_jsonl(out)) == len(lines)


def test_duplicates_refuse_the_file(tinystories_worker: WorkerProcess, tmp_path: Path) -> None:
    lines = [completion("a", "x"), completion("b", "y"), completion("a", "z")]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = cli(tinystories_worker.endpoint, str(src), "-o", str(out))
    assert proc.returncode == 2
    assert "duplicate custom_id: 'a' (lines 1 and 3)" in proc.stderr
    assert "nothing was sent" in proc.stderr
    assert not out.exists()
    with pytest.raises(BatchInputError, match="duplicate custom_id"):
        run_batch(src, out, endpoint="ipc:///nonexistent/never-contacted.sock")


def test_killed_run_resumes_without_duplicates(
    tinystories_worker: WorkerProcess, tmp_path: Path
) -> None:
    requests = many(96, 48)
    src = write_jsonl(tmp_path / "in.jsonl", requests)
    out = tmp_path / "out.jsonl"
    proc = start_cli(tinystories_worker.endpoint, str(src), "-o", str(out))
    running, in_flight = [], []
    deadline = time.monotonic() + 60
    while out_lines(out) < 24 and time.monotonic() < deadline:
        pong = ping(tinystories_worker.endpoint)
        running.append(pong[0])
        in_flight.append(pong[0] + pong[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = out.read_bytes()
    finished = read_jsonl(out)  # every line whole: each was one write
    assert 24 <= len(finished) < len(requests), "the kill must land mid-run"
    # The worker's batch was kept full (8), with never more than 8 + 4 sent at once.
    assert max(running) == 8 and max(in_flight) <= 12, (running, in_flight)
    with out.open("ab") as f:  # a torn last line, as a crash mid-write would leave
        f.write(b'{"id":"batch_req_x","custom_id":"r95","respo')
    resumed = cli(tinystories_worker.endpoint, str(src), "-o", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stderr
    assert out.read_bytes().startswith(kept)  # what was finished is untouched
    records = read_jsonl(out)
    assert sorted(r["custom_id"] for r in records) == sorted(r["custom_id"] for r in requests)
    expected = reference(tinystories_worker.endpoint, requests)
    for record in records:
        assert_matches(record, expected[record["custom_id"]])


def out_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def ping(endpoint: str) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        async with AsyncClient(endpoint) as client:
            pong = await client.ping()
            return pong.running, pong.waiting

    return asyncio.run(run())


def test_interrupt_cancels_in_flight(tinystories_worker: WorkerProcess, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", many(64, 200))
    out = tmp_path / "out.jsonl"
    proc = start_cli(tinystories_worker.endpoint, str(src), "-o", str(out))
    wait_lines(out, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130, stderr
    assert "interrupted; every finished result is in" in stderr
    assert 4 <= len(read_jsonl(out)) < 64
    deadline = time.monotonic() + 2
    while ping(tinystories_worker.endpoint) != (0, 0):  # in-flight requests were cancelled
        assert time.monotonic() < deadline, "the worker still runs the interrupted requests"
        time.sleep(0.02)


def test_retry_failed_and_sort(
    fresh_worker_factory: type[WorkerProcess], tinystories_worker: WorkerProcess, tmp_path: Path
) -> None:
    small = fresh_worker_factory(TINYSTORIES, "--max-prompt-tokens", "12")
    requests = [
        completion("short1", "Once upon a time", 8),
        completion("long", "Once upon a time, there was a little girl named Lily who", 8),
        completion("short2", "The dog", 8),
    ]
    src = write_jsonl(tmp_path / "in.jsonl", requests)
    out = tmp_path / "out.jsonl"
    first = cli(small.endpoint, str(src), "-o", str(out))
    assert first.returncode == 1
    failed = by_id(read_jsonl(out))["long"]
    assert failed["error"]["code"] == "context_length_exceeded" and failed["error"]["line"] == 2
    before = out.read_text()
    # Without --retry-failed the error stands; with it, only that line runs again.
    assert cli(tinystories_worker.endpoint, str(src), "-o", str(out)).returncode == 1
    assert out.read_text() == before
    retry = cli(tinystories_worker.endpoint, str(src), "-o", str(out), "--retry-failed")
    assert retry.returncode == 0, retry.stderr
    records = read_jsonl(out)
    assert out.read_text().startswith(before)  # append-only: the old error line is still there
    assert [r["custom_id"] for r in records].count("long") == 2
    assert [r["custom_id"] for r in records].count("short1") == 1
    assert records[-1]["custom_id"] == "long" and records[-1]["error"] is None  # last one wins
    # --sort: one line per custom_id (the last), in input order.
    sort = cli(tinystories_worker.endpoint, str(src), "-o", str(out), "--sort", "--quiet")
    assert sort.returncode == 0 and sort.stderr == ""
    ordered = read_jsonl(out)
    assert [r["custom_id"] for r in ordered] == ["short1", "long", "short2"]
    assert ordered[1] == records[-1]
    expected = reference(tinystories_worker.endpoint, requests)
    for record in ordered:
        assert_matches(record, expected[record["custom_id"]])


def test_worker_death_leaves_output_resumable(
    fresh_worker_factory: type[WorkerProcess], tinystories_worker: WorkerProcess, tmp_path: Path
) -> None:
    doomed = fresh_worker_factory(TINYSTORIES, "--max-batch", "4")
    requests = many(48, 100)
    src = write_jsonl(tmp_path / "in.jsonl", requests)
    out = tmp_path / "out.jsonl"
    proc = start_cli(doomed.endpoint, str(src), "-o", str(out))
    wait_lines(out, 4, proc)
    doomed.stop(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 3, stderr
    assert "worker unavailable" in stderr and "run the same command again to resume" in stderr
    kept = len(read_jsonl(out))
    assert 4 <= kept < len(requests)
    # Resumed against another worker (same model): every request exactly once.
    resumed = cli(tinystories_worker.endpoint, str(src), "-o", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(r["custom_id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(48))


def test_busy_is_retried_not_failed(
    fresh_worker_factory: type[WorkerProcess], tmp_path: Path
) -> None:
    tiny = fresh_worker_factory(TINYSTORIES, "--max-batch", "2", "--max-queue", "1")
    src = write_jsonl(tmp_path / "in.jsonl", many(24, 16))
    out = tmp_path / "out.jsonl"
    progress = BatchProgress("quiet")
    summary = run_batch(src, out, endpoint=tiny.endpoint, max_in_flight=12, progress=progress)
    assert summary.busy_retries > 0  # 12 in flight against room for 3: the worker said busy
    assert summary.ok == 24 and summary.failed == 0
    assert all(r["error"] is None for r in read_jsonl(out))


def test_window_and_progress_lines(tinystories_worker: WorkerProcess, tmp_path: Path) -> None:
    limits = Limits(
        max_message_bytes=1 << 20,
        max_prompt_tokens=511,
        max_tokens=512,
        max_batch=16,
        max_queue=64,
        context_length=512,
    )
    assert in_flight_window(limits) == 24
    assert in_flight_window(limits.__class__(**{**limits.__dict__, "max_queue": 1})) == 17
    # Not a terminal: plain lines and the summary on stderr, nothing on stdout.
    src = write_jsonl(tmp_path / "in.jsonl", many(6, 8))
    proc = cli(tinystories_worker.endpoint, str(src), "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 0 and proc.stdout == ""
    assert "ffai batch: 6 requests to run (0 done before)" in proc.stderr
    assert "requests   6 in the input: 6 ok, 0 failed, 0 already done" in proc.stderr
    assert "generated tok/s" in proc.stderr
    assert os.path.getsize(tmp_path / "out.jsonl") > 0
    # A terminal gets the bar: done/total, errors and tok/s (tqdm adds the ETA).
    screen = io.StringIO()
    bar = BatchProgress("bar", stream=screen)
    run_batch(src, tmp_path / "bar.jsonl", endpoint=tinystories_worker.endpoint, progress=bar)
    assert "6/6" in screen.getvalue() and "errors=0" in screen.getvalue(), screen.getvalue()
    assert "tok/s" in screen.getvalue()
    # An output that cannot be written refuses the run (exit 2), like a bad input.
    proc = cli(tinystories_worker.endpoint, str(src), "-o", str(tmp_path / "no" / "out.jsonl"))
    assert proc.returncode == 2 and "cannot write" in proc.stderr, proc.stderr


NO_HTTP_SCRIPT = """
import importlib.abc, sys

class NoHTTP(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("starlette", "uvicorn", "sse_starlette", "prometheus_client"):
            raise ImportError(f"HTTP packages are blocked in this test: {name}")
        return None

sys.meta_path.insert(0, NoHTTP())
from ffai_client.cli import main
main()
"""


def test_runs_without_the_gateway_extra(tinystories_worker: WorkerProcess, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl", [completion("a", "Once upon a time", 8), chat("b", "Hi", 8)]
    )
    out = tmp_path / "out.jsonl"
    args = ["batch", str(src), "-o", str(out), "--endpoint", tinystories_worker.endpoint]
    proc = subprocess.run(
        [sys.executable, "-c", NO_HTTP_SCRIPT, *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["error"] for r in read_jsonl(out)] == [None, None]
