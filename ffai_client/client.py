"""`AsyncClient`: one DEALER socket, many concurrent requests multiplexed by id.

The socket is a plain (sync) ZeroMQ socket whose file descriptor is watched by
the event loop (`loop.add_reader`); each wake-up drains every waiting frame
and routes it to the request it answers. Measured against pyzmq's asyncio
socket, which arms a future and walks its event flags per frame, this halves
the client's CPU per streamed chunk; that matters when many client
processes share a small machine with the worker. A watchdog
pings the worker when it has been quiet for `heartbeat_interval` while
requests are pending, and fails them all with `WorkerUnavailable` once nothing
has arrived for `timeout` seconds; the socket is then rebuilt, so requests
queued for the dead worker are dropped and new ones reach a restarted one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

import zmq

from ffai_client import protocol as p
from ffai_client.endpoints import resolve_endpoint
from ffai_client.errors import ProtocolError, WorkerUnavailable, error_for_code
from ffai_client.stream import GenerationStream
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationChunk,
    GenerationParameters,
    GenerationResult,
)

_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag arithmetic is slow on the hot path
DEFAULT_TIMEOUT = 5.0
DEFAULT_HEARTBEAT = 1.0

# What a pending request waits on: a queue of items for streams, a future for replies.
_Item = Any


class _Pending:
    """One request awaiting frames from the worker."""

    def __init__(self, streaming: bool) -> None:
        self.queue: asyncio.Queue[_Item] | None = asyncio.Queue() if streaming else None
        self.future: asyncio.Future[Any] | None = (
            None if streaming else asyncio.get_running_loop().create_future()
        )

    def deliver(self, item: _Item) -> None:
        if self.queue is not None:
            self.queue.put_nowait(item)
        elif self.future is not None and not self.future.done():
            if isinstance(item, BaseException):
                self.future.set_exception(item)
            else:
                self.future.set_result(item)


class AsyncClient:
    """Talks to one worker. Safe to share across tasks of one event loop."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT,
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = timeout
        self.heartbeat_interval = min(heartbeat_interval, timeout / 2)
        self.welcome: p.Welcome | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{os.urandom(3).hex()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._last_heard = time.monotonic()
        self._last_ping = 0.0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> AsyncClient:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail pending requests, stop the watchdog, close the socket."""
        self._closed = True
        self._fail_all(WorkerUnavailable("the client was closed"))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        # A short linger lets a just-queued cancel reach the worker.
        self._close_socket(linger=250)

    def _ensure_started(self) -> None:
        if self._closed:
            raise WorkerUnavailable("the client is closed")
        if self._sock is None:
            self._loop = asyncio.get_running_loop()
            self._open_socket()
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._watchdog(), name="ffai-watchdog")]

    def _open_socket(self) -> None:
        assert self._loop is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.IPV6, 1)  # else libzmq cannot reach tcp://[::1]:port
        sock.connect(self.endpoint)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._drain)
        self._send_nowait(p.Hello(client=f"ffai_client/{os.getpid()}"))

    def _close_socket(self, linger: int) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close(linger=linger)

    # -- plumbing --------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _register(self, request_id: str, streaming: bool) -> _Pending:
        if not self._pending:
            self._last_heard = time.monotonic()  # the silence clock starts with the first request
        pending = _Pending(streaming)
        self._pending[request_id] = pending
        return pending

    def _forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def _send_nowait(self, msg: Any) -> None:
        """Queue a frame without waiting (the DEALER queues until the worker is there)."""
        sock = self._sock
        if sock is None:
            return
        try:
            sock.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # dropped: the watchdog reports an unreachable worker
        # The descriptor is edge-triggered and a send can consume the edge of a
        # frame that just arrived: look again once this callback is done.
        if int(sock.getsockopt(zmq.EVENTS)) & _POLLIN and self._loop is not None:
            self._loop.call_soon(self._drain)

    async def _request(self, msg: Any) -> Any:
        """Send one request and wait for its single reply frame."""
        self._ensure_started()
        pending = self._register(msg.id, streaming=False)
        assert pending.future is not None
        self._send_nowait(msg)
        try:
            return await pending.future
        finally:
            self._forget(msg.id)

    def start_stream(self, msg: p.Generate) -> asyncio.Queue[_Item]:
        """Register a generate and send it; returns the queue its frames arrive on."""
        self._ensure_started()
        if msg.id in self._pending:
            raise ValueError(f"request id {msg.id!r} is already in use on this client")
        pending = self._register(msg.id, streaming=True)
        assert pending.queue is not None
        self._send_nowait(msg)
        return pending.queue

    def cancel_nowait(self, request_id: str) -> None:
        """Tell the worker to stop `request_id`; idempotent, never blocks."""
        self._send_nowait(p.Cancel(id=request_id))

    def _drain(self) -> None:
        """Route every frame waiting on the socket (called when its descriptor is readable)."""
        sock = self._sock
        while sock is not None and sock is self._sock:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us: the watchdog rebuilds it if needed
            self._last_heard = time.monotonic()
            self._route(data)

    def _route(self, data: bytes) -> None:
        try:
            msg = p.decode_worker(data)
        except p.FrameError as exc:
            if exc.request_id in self._pending:
                self._pending[exc.request_id].deliver(ProtocolError(str(exc)))
            return
        if isinstance(msg, p.Welcome):
            self.welcome = msg
            return
        rid: str | None = getattr(msg, "id", None)
        pending = self._pending.get(rid) if rid is not None else None
        if pending is None or rid is None:
            return  # a pong, or a frame for a request we abandoned
        if isinstance(msg, p.Error):
            pending.deliver(error_for_code(msg.code, msg.message, msg.id))
            self._pending.pop(rid, None)  # terminal: the waiter holds its queue or future
        elif isinstance(msg, p.Chunk):
            chunk = msg.to_generation_chunk()
            pending.deliver(chunk)
            if chunk.is_final:
                self._pending.pop(rid, None)
        else:
            pending.deliver(msg)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(min(0.1, self.heartbeat_interval / 4))
            if not self._pending:
                continue
            now = time.monotonic()
            silence = now - self._last_heard
            if silence > self.timeout:
                self._fail_all(
                    WorkerUnavailable(
                        f"no answer from the worker at {self.endpoint} for {silence:.1f} s"
                    )
                )
                self._reset_socket()
            elif (
                silence > self.heartbeat_interval
                and now - self._last_ping > self.heartbeat_interval
            ):
                self._last_ping = now
                self._send_nowait(p.Ping(id=None))

    def _fail_all(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.deliver(error)

    def _reset_socket(self) -> None:
        self._close_socket(linger=0)
        if not self._closed:
            self._open_socket()

    # -- public API ------------------------------------------------------------
    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage] | None = None,
        tokens: Sequence[int] | None = None,
        parameters: GenerationParameters | None = None,
        options: ChatTemplateOptions | None = None,
        add_special_tokens: bool = True,
        request_id: str | None = None,
    ) -> GenerationStream:
        """Stream a generation: `async for chunk in client.generate_stream(...)`.

        Also an async context manager. Breaking out, `aclose()`, leaving the
        `async with`, or cancelling the task sends a cancel to the worker.
        """
        given = sum(x is not None for x in (prompt, messages, tokens))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages or tokens")
        msg = p.Generate(
            id=request_id or self.new_request_id(),
            prompt=prompt,
            tokens=list(tokens) if tokens is not None else None,
            messages=list(messages) if messages is not None else None,
            params=parameters or GenerationParameters(),
            options=options,
            add_special_tokens=add_special_tokens,
        )
        return GenerationStream(self, msg)

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        """Run a generation to the end and collect it (a collector over generate_stream)."""
        texts: list[str] = []
        generated: list[int] = []
        final: GenerationChunk | None = None
        async with self.generate_stream(prompt, **kwargs) as stream:
            async for chunk in stream:
                texts.append(chunk.text)
                generated.extend(chunk.tokens)
                if chunk.is_final:
                    final = chunk
        if final is None or final.stats is None:
            raise ProtocolError("the stream ended without a final chunk")
        return GenerationResult(
            prompt_tokens=final.stats.prompt_tokens,
            generated_tokens=generated,
            text="".join(texts),
            stats=final.stats,
            finish_reason=final.finish_reason,
        )

    async def cancel(self, request_id: str) -> None:
        """Cancel a request by id (harmless if it is unknown or already finished)."""
        self._ensure_started()
        self.cancel_nowait(request_id)

    async def ping(self) -> p.Pong:
        reply: p.Pong = await self._request(p.Ping(id=self.new_request_id()))
        return reply

    async def info(self) -> p.InfoReply:
        reply: p.InfoReply = await self._request(p.InfoRequest(id=self.new_request_id()))
        return reply

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        msg = p.TokenizeRequest(
            id=self.new_request_id(), text=text, add_special_tokens=add_special_tokens
        )
        reply: p.TokenizeReply = await self._request(msg)
        return list(reply.tokens)

    async def detokenize(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        msg = p.DetokenizeRequest(
            id=self.new_request_id(), tokens=list(tokens), skip_special_tokens=skip_special_tokens
        )
        reply: p.DetokenizeReply = await self._request(msg)
        return reply.text

    async def render(
        self, messages: Sequence[ChatMessage], options: ChatTemplateOptions | None = None
    ) -> p.RenderReply:
        """Render messages through the worker's chat template (text and token ids)."""
        msg = p.RenderRequest(id=self.new_request_id(), messages=list(messages), options=options)
        reply: p.RenderReply = await self._request(msg)
        return reply
