"""`GenerationStream`: the async iterator (and async context manager) of one generation."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ffai_client.errors import ClientClosed, WorkerUnavailable
from ffai_client.types import GenerationChunk

if TYPE_CHECKING:
    from ffai_client import protocol as p
    from ffai_client.client import AsyncClient
    from ffai_client.connection import Pending


class GenerationStream:
    """Chunks of one generation, in order; the last has `stats` and `finish_reason`.

    The request goes out on first use (`async for`, `__anext__` or `async
    with`). Abandoning the stream early — `break`, `aclose()`, leaving the
    `async with`, cancelling the consuming task, or just dropping it — sends a
    cancel, so the worker stops that sequence at its next token boundary.
    """

    def __init__(
        self, client: AsyncClient, request: p.Generate, request_timeout: float | None = None
    ) -> None:
        self._client = client
        self._request = request
        self._request_timeout = request_timeout
        self._queue: asyncio.Queue[Any] | None = None
        self._pending: Pending | None = None
        self._done = False
        self.final: GenerationChunk | None = None  # the terminal chunk, once seen

    @property
    def request_id(self) -> str:
        return self._request.id

    @property
    def endpoint(self) -> str | None:
        """The worker serving this stream (the last one tried); None before it starts."""
        conn = self._pending.conn if self._pending is not None else None
        return conn.endpoint if conn is not None else None

    def _start(self) -> asyncio.Queue[Any]:
        if self._queue is None:
            self._pending = self._client._open_stream(self._request, self._request_timeout)
            assert self._pending.queue is not None
            self._queue = self._pending.queue
        return self._queue

    async def __aenter__(self) -> GenerationStream:
        self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        queue = self._start()
        try:
            item = await queue.get()
        except asyncio.CancelledError:
            self._abandon()
            raise
        return self._take(item)

    def _take(self, item: Any) -> GenerationChunk:
        if isinstance(item, BaseException):
            self._finish()
            raise item
        chunk: GenerationChunk = item
        if chunk.is_final:
            self.final = chunk
            self._finish()
        return chunk

    def _finish(self) -> None:
        self._done = True
        self._client._forget(self.request_id)

    def _abandon(self) -> None:
        # The consuming task was cancelled: tell the worker at once. The terminal
        # frame still lands in our queue (then the client forgets the id), so a
        # later `aclose()` can collect it.
        if not self._done and self._queue is not None:
            self._client._send_cancel(self.request_id)

    async def cancel(self) -> None:
        """Ask the worker to stop; keep iterating to receive the `cancelled` final chunk."""
        if self._queue is not None and not self._done:
            self._client._send_cancel(self.request_id)

    async def aclose(self) -> None:
        """Cancel if unfinished and wait (up to the client's timeout) for the terminal frame."""
        if self._done or self._queue is None:
            self._done = True
            return
        self._client._send_cancel(self.request_id)
        try:
            while not self._done:
                item = await asyncio.wait_for(self._queue.get(), self._client.timeout)
                try:
                    self._take(item)
                except Exception:
                    break
        except (TimeoutError, WorkerUnavailable, ClientClosed):
            pass
        finally:
            self._finish()

    def __del__(self) -> None:
        # Dropped mid-stream (e.g. `break` out of a bare `async for`): still cancel.
        if not self._done and self._queue is not None:
            try:
                self._client._send_cancel(self.request_id)
                self._client._forget(self.request_id)
            except Exception:
                pass
