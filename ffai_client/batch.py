"""Batch jobs: an OpenAI Batch-API JSONL file run through one worker, resumable.

    summary = run_batch("requests.jsonl", "results.jsonl")   # what `ffai batch` runs

Input lines are `{"custom_id", "method": "POST", "url", "body"}` with `url`
`/v1/chat/completions` or `/v1/completions`; `body` takes exactly the fields
the gateway's endpoints take (the same code reads it: `gateway.openai_params`)
except `stream`. Output lines are `{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}`; `body` is the endpoint's
`chat.completion` / `text_completion` object, usage included. A failed line
has `error` set (`code`, `message`, `line`: its input line number) and the
status and error body the gateway would have answered in `response`.

Guarantees:
- Every line is checked (envelope, then body, against the worker's limits)
  before any generation is sent; a bad line becomes an error line, the run
  goes on. Duplicate custom_ids refuse the file (`BatchInputError`).
- Results are appended in completion order, each line one write(2) to an
  unbuffered file as its request finishes, so a killed run loses nothing it
  finished; fsync runs per group (at most every second, off the event loop,
  and at the end): see `batch_io.OutputWriter` for why.
- The output is append-only and the last line per custom_id wins. Rerunning
  with the same output skips custom_ids already there; `retry_failed` reruns
  those whose last line is an error, appending the new result after it.
  `sort` rewrites the file at the end, one line per custom_id (the winner),
  in input order.
- Up to the worker's `max_batch` plus a small queue (never past its
  `max_queue`) sequences are in flight; `busy` answers are retried with
  backoff and are not failures; request errors (prompt too long, bad
  parameters, template errors) become error lines. A lost worker stops the
  run with `WorkerUnavailable`, and cancelling the task (Ctrl-C) stops it
  too: in-flight requests are cancelled on the worker, nothing half-done is
  written, and the same command resumes.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffai_client.batch_io import (
    CHAT_URL,
    BatchInputError,
    InputLine,
    OutputWriter,
    error_line,
    parse_input,
    read_done,
    result_line,
    sort_output,
)
from ffai_client.batch_progress import BatchProgress, BatchSummary
from ffai_client.client import DEFAULT_TIMEOUT
from ffai_client.endpoints import resolve_endpoint
from ffai_client.errors import Busy, ClientClosed, FFAIError, ShuttingDown, WorkerUnavailable
from ffai_client.gateway import openai_params as op
from ffai_client.gateway.errors import ApiError, bad_field, from_worker
from ffai_client.gateway.fields import Body
from ffai_client.gateway.generation import merge, run_job
from ffai_client.gateway.openai_shape import Shape
from ffai_client.gateway.workers import WorkerHandle, WorkerPool
from ffai_client.messages import Limits

BUSY_FIRST_S = 0.05  # first wait after a `busy`; doubles up to BUSY_MAX_S
BUSY_MAX_S = 2.0
_FATAL = (WorkerUnavailable, ClientClosed, ShuttingDown)  # the run cannot go on

__all__ = ["BatchInputError", "BatchProgress", "BatchSummary", "run_batch", "run_batch_async"]


def in_flight_window(limits: Limits) -> int:
    """Sequences to keep in flight: a full batch, plus a queue that refills a freed slot at once."""
    return limits.max_batch + min(limits.max_queue, max(2, limits.max_batch // 2))


@dataclass(frozen=True)
class _Ready:
    """A checked input line: its jobs for the worker."""

    item: InputLine
    chat: bool
    plan: op.Plan
    worker: WorkerHandle


def run_batch(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    **options: Any,
) -> BatchSummary:
    """`run_batch_async` in its own event loop (the keyword options are the same)."""
    return asyncio.run(run_batch_async(input_path, output_path, **options))


async def run_batch_async(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_failed: bool = False,
    sort: bool = False,
    max_in_flight: int | None = None,
    progress: BatchProgress | None = None,
) -> BatchSummary:
    """Run every input request not yet in the output; return what this run did.

    Raises `BatchInputError` (unreadable input, duplicate custom_ids, an
    output that cannot be written: nothing is sent) and `WorkerUnavailable`
    (the worker is gone: the output holds every finished request and the
    same call resumes).
    """
    source, target = Path(input_path), Path(output_path)
    if target.exists() and source.resolve() == target.resolve():
        raise BatchInputError("the output file must not be the input file")
    lines = parse_input(source)
    previous = read_done(target)
    todo = [
        item
        for item in lines
        if item.key not in previous or (retry_failed and not previous[item.key])
    ]
    skipped = sum(1 for item in lines if previous.get(item.key))
    progress = progress or BatchProgress("quiet")
    address = resolve_endpoint(endpoint)
    pool = WorkerPool([address], timeout)
    worker = WorkerHandle(address, timeout)
    pool.workers = [worker]  # not pool.start(): it waits out an absent worker and hides why
    try:
        writer = OutputWriter(target)
    except OSError as exc:
        await pool.close()
        raise BatchInputError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        worker.info = await worker.client.info()  # raises WorkerUnavailable, unlike refresh()
        progress.begin(len(lines), skipped, len(lines) - skipped - len(todo))
        ready = await _prepare_all(pool, todo, writer, progress)
        window = max_in_flight or in_flight_window(worker.info.limits)
        await _Runner(writer, progress, window).run(ready)
    finally:
        writer.close()
        progress.close()
        await pool.close()
    if sort:
        sort_output(target, [item.key for item in lines])
    return progress.summary


async def _prepare_all(
    pool: WorkerPool, todo: list[InputLine], writer: OutputWriter, progress: BatchProgress
) -> list[_Ready]:
    """Check every line before sending anything; bad ones are written as error lines now."""
    ready: list[_Ready] = []
    for item in todo:
        result = await _prepare(pool, item)
        if isinstance(result, _Ready):
            ready.append(result)
        else:
            writer.write(result)
            progress.finished(False)
    return ready


async def _prepare(pool: WorkerPool, item: InputLine) -> _Ready | dict[str, Any]:
    """The line's jobs, or its error line (the same checks, in the same order, as the gateway)."""
    if item.error is not None:
        return error_line(item, item.error.code, item.error.message, item.error.status)
    assert item.body is not None
    body = Body(item.body)
    chat = item.url == CHAT_URL
    try:
        if body.flag("stream"):
            raise bad_field("stream", "a batch request cannot stream (its result is one line)")
        op.check_unsupported(body)
        worker = await pool.route(body.text("model"))
        plan = await (op.chat_plan if chat else op.completion_plan)(body, worker)
    except ApiError as exc:
        return _api_error(item, exc, f"line {item.line}: ")
    except _FATAL:
        raise
    except FFAIError as exc:  # the worker refused a tokenize/detokenize the body needed
        return _api_error(item, from_worker(exc, "messages" if chat else "prompt"))
    return _Ready(item, chat, plan, worker)


def _api_error(item: InputLine, exc: ApiError, prefix: str = "") -> dict[str, Any]:
    code = exc.code or exc.type
    return error_line(item, code, prefix + exc.message, exc.status, exc.openai_body())


class _Runner:
    """Keeps `window` sequences in flight and writes each result as it finishes."""

    def __init__(self, writer: OutputWriter, progress: BatchProgress, window: int) -> None:
        self.writer = writer
        self.progress = progress
        self.window = max(1, window)
        self.used = 0  # sequences in flight
        self.fatal: BaseException | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    async def run(self, ready: list[_Ready]) -> None:
        try:
            for r in ready:
                weight = min(len(r.plan.jobs), self.window)
                while self.fatal is None and self.used and self.used + weight > self.window:
                    self._wake.clear()
                    await self._wake.wait()
                if self.fatal is not None:
                    break
                self._start(r, weight)
            while self.tasks and self.fatal is None:
                self._wake.clear()
                await self._wake.wait()
        finally:
            # Ctrl-C, a lost worker: cancelling a task cancels its request on the worker.
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal

    def _start(self, r: _Ready, weight: int) -> None:
        self.used += weight
        task = asyncio.create_task(self._one(r))
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self.used -= weight
            if not t.cancelled() and t.exception() is not None and self.fatal is None:
                self.fatal = t.exception()
            self._wake.set()

        task.add_done_callback(done)

    async def _one(self, r: _Ready) -> None:
        """One request to its end; `busy` waits and tries again, request errors are written."""
        delay = BUSY_FIRST_S
        while True:
            shape = Shape(r.chat, r.worker.model_id, r.plan.groups, include_usage=False)
            try:
                async for index, event in merge([run_job(r.worker, j) for j in r.plan.jobs]):
                    shape.take(index, event)
            except Busy:
                self.progress.busy()
                # Jittered, so requests refused together do not come back together.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BUSY_MAX_S)
                continue
            except _FATAL:
                raise
            except FFAIError as exc:
                error = from_worker(exc, "messages" if r.chat else "prompt")
                self.writer.write(_api_error(r.item, error))
                self.progress.finished(False)
                return
            if any(c.final and c.final.finish_reason == "cancelled" for c in shape.choices):
                # Not ours (we never cancel a request we await): the worker is going away.
                raise WorkerUnavailable(f"the worker cancelled request {r.item.custom_id!r}")
            body = shape.whole()
            assert r.item.custom_id is not None
            self.writer.write(result_line(r.item.custom_id, body))
            usage = body["usage"]
            self.progress.finished(True, usage["prompt_tokens"], usage["completion_tokens"])
            return
