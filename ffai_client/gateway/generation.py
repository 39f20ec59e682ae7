"""One generation as a stream of gateway events, shared by the OpenAI and Ollama routes.

`run_job` turns a worker's chunks into `TextDelta`, `ToolCall` (when the
request carries tools) and one `Final`. `merge` interleaves several jobs
(`n` > 1) tagged with their choice index. `until_disconnect` races an
awaitable against the HTTP client going away, so a client that leaves while
its prompt is queued or prefilling still gets its request cancelled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, Union

from ffai_client.gateway.toolcalls import PARSERS, ParsedEvent, TextDelta, ToolCall
from ffai_client.gateway.workers import ToolFormat, WorkerHandle
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationParameters,
    GenerationStats,
)

if TYPE_CHECKING:  # only the HTTP helpers below use it; the batch runner has no Starlette
    from starlette.requests import Request

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One request to a worker: exactly one of prompt, messages or tokens."""

    parameters: GenerationParameters
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tokens: list[int] | None = None
    options: ChatTemplateOptions | None = None
    add_special_tokens: bool = True
    echo: str = ""  # text shown before the generated text (completions' `echo`)
    tools: ToolFormat | None = None  # parse tool calls in this format


@dataclass(frozen=True)
class Final:
    finish_reason: str  # stop, length, cancelled, or tool_calls
    stats: GenerationStats
    tool_calls: int = 0


Event = Union[TextDelta, ToolCall, Final]  # noqa: UP007 - a runtime alias


async def run_job(
    worker: WorkerHandle, job: Job, on_cancel: Callable[[], None] | None = None
) -> AsyncGenerator[Event]:
    """Stream one job's events. Leaving early (break, cancel, aclose) cancels it on the worker."""
    stream = worker.client.generate_stream(
        job.prompt,
        messages=job.messages,
        tokens=job.tokens,
        parameters=job.parameters,
        options=job.options,
        add_special_tokens=job.add_special_tokens,
    )
    parser = PARSERS[job.tools.family]() if job.tools is not None else None
    if job.echo:
        yield TextDelta(job.echo)
    try:
        async for chunk in stream:
            if chunk.stats is not None:
                events: list[ParsedEvent] = parser.finish() if parser else []
                for event in events:
                    yield event
                calls = parser.calls if parser else 0
                reason = str(chunk.finish_reason or "stop")
                if calls and reason == "stop":
                    reason = "tool_calls"
                yield Final(reason, chunk.stats, calls)
                return
            if parser is None or job.tools is None:
                if chunk.text:
                    yield TextDelta(chunk.text)
                continue
            text = await worker.restore_markers(job.tools, chunk.text, chunk.tokens)
            for event in parser.feed(text):
                yield event
    finally:
        if stream.final is None:
            await stream.cancel()  # sends at once, never waits: safe in a cancelled task
            if on_cancel is not None:
                on_cancel()


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncGenerator[tuple[int, Event]]:
    """Events of several streams as (index, event), in arrival order; one stream: no tasks."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def wait_disconnect(request: Request) -> None:
    """Return when the HTTP client has gone away (its body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client leaves first: then cancel it, raise ClientGone."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()  # the generator's stream sends the cancel from inside the task
    with contextlib.suppress(BaseException):
        await work
    raise ClientGone()
