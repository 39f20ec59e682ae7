"""`AsyncClient`: one DEALER socket, many concurrent requests multiplexed by id.

The socket is a plain (sync) ZeroMQ socket whose file descriptor is watched by
the event loop (`loop.add_reader`); each wake-up drains every waiting frame
and routes it to the request it answers (half the CPU per chunk of pyzmq's
asyncio socket, which matters when many clients share a small machine).

Liveness (SPEC 8) is libzmq's, not ours: ZMTP heartbeats run in libzmq's I/O
threads on both sides, so a worker busy in a 30 s step still answers them,
and a socket monitor reports the connection's end. A worker that exits or is
killed is noticed at once (the kernel closes its end); one that is frozen
(SIGSTOP, a dead host) after `3 x heartbeat_interval`. Pending requests then
fail with `WorkerUnavailable` and the socket is rebuilt, so nothing queued for
the old worker reaches a new one. `timeout` bounds only the wait for a
connection; `request_timeout` (off by default) bounds the silence of one
request, for hangs, and is never mistaken for death.
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
from ffai_client.curve import CurveClientKeys
from ffai_client.endpoints import check_ipc_endpoint, ipc_path, resolve_endpoint
from ffai_client.errors import (
    AuthenticationFailed,
    ClientClosed,
    ProtocolError,
    RequestTimeout,
    WorkerUnavailable,
    error_for_code,
)
from ffai_client.stream import GenerationStream
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationParameters,
    GenerationResult,
    ResultBuilder,
)

_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag arithmetic is slow on the hot path
DEFAULT_TIMEOUT = 5.0  # seconds a request waits for a connection to a worker
DEFAULT_HEARTBEAT = 1.0  # ZMTP heartbeat interval; a silent peer is dropped after 3 of them
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MONITOR_EVENTS = int(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)

# What a pending request waits on: a queue of items for streams, a future for replies.
_Item = Any


class _Pending:
    """One request awaiting frames from the worker."""

    def __init__(self, streaming: bool, timeout: float | None) -> None:
        self.timeout = timeout  # longest silence allowed for this request (None: no limit)
        self.created = self.last_heard = time.monotonic()
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
    """Talks to one worker. Safe to share across tasks of one event loop.

    `timeout`: how long a request may wait for a connection to a worker.
    `heartbeat_interval`: ZMTP heartbeat period; a frozen worker is dropped
    after three silent intervals. `request_timeout`: the longest silence one
    request tolerates before `RequestTimeout` (None: wait as long as the
    worker is alive). `curve`: CurveZMQ keys (default: from FFAI_CURVE_SERVER_KEY
    and FFAI_CURVE_KEY when set); a refused handshake fails requests at once
    with `AuthenticationFailed`.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT,
        request_timeout: float | None = None,
        curve: CurveClientKeys | None = None,
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.curve = curve if curve is not None else CurveClientKeys.from_env()
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.request_timeout = request_timeout
        self.welcome: p.Welcome | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{os.urandom(3).hex()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._refused = False  # the last handshake was refused (libzmq will not retry it)
        self._unconnected_since = time.monotonic()  # start of the current wait for a worker
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> AsyncClient:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail pending requests with `ClientClosed`, stop the watchdog, close the socket.

        Idempotent; any later call on this client raises `ClientClosed`.
        """
        self._closed = True
        self._fail_all(ClientClosed("the client was closed"))
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

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this client is closed; create a new one")

    def _ensure_started(self) -> None:
        self._check_open()
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
        sock.setsockopt(zmq.IPV6, 1)
        ivl = max(1, int(self.heartbeat_interval * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        # A ping goes out at most one interval after the peer froze, then has two
        # intervals to be answered: a frozen worker is dropped within 3 intervals.
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2 * ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ivl)
        if self.curve is not None:
            self.curve.apply(sock)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self._sock, self._monitor = sock, monitor
        self._connected = False
        self._refused = False
        self._unconnected_since = time.monotonic()
        self._loop.add_reader(sock.fileno(), self._drain)
        self._loop.add_reader(monitor.fileno(), self._drain_monitor)
        # Monitor events may already be queued (the descriptor is edge-triggered).
        self._loop.call_soon(self._drain_monitor)
        self._send_nowait(p.Hello(client=f"ffai_client/{os.getpid()}"))

    def _close_socket(self, linger: int) -> None:
        sock, self._sock = self._sock, None
        monitor, self._monitor = self._monitor, None
        self._connected = False
        live_loop = self._loop is not None and not self._loop.is_closed()
        if monitor is not None:
            if live_loop:
                self._loop.remove_reader(monitor.fileno())  # type: ignore[union-attr]
            if sock is not None:
                sock.disable_monitor()
            monitor.close(linger=0)
        if sock is None:
            return
        if live_loop:
            self._loop.remove_reader(sock.fileno())  # type: ignore[union-attr]
        sock.close(linger=linger)

    # -- plumbing --------------------------------------------------------------
    def _next_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _register(self, request_id: str, streaming: bool, timeout: float | None = None) -> _Pending:
        self._drain_monitor()  # a worker that went away while we were idle is news now
        if not self._connected:
            self._check_reachable()
            if self._refused:
                self._reset_socket()  # one fresh handshake per request after a refusal
        pending = _Pending(streaming, self.request_timeout if timeout is None else timeout)
        self._pending[request_id] = pending
        return pending

    def _check_reachable(self) -> None:
        """Fail at once where waiting cannot help: no socket file, or an unsafe one."""
        path = ipc_path(self.endpoint)
        if path is None:
            return
        check_ipc_endpoint(self.endpoint)
        if not path.exists():
            raise WorkerUnavailable(
                f"no worker at {self.endpoint}; start one with `ffai-worker serve`"
            )

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

    def _open_stream(
        self, msg: p.Generate, request_timeout: float | None = None
    ) -> asyncio.Queue[_Item]:
        """Register a generate and send it; returns the queue its frames arrive on."""
        self._ensure_started()
        if msg.id in self._pending:
            raise ValueError(f"request id {msg.id!r} is already in use on this client")
        pending = self._register(msg.id, streaming=True, timeout=request_timeout)
        assert pending.queue is not None
        self._send_nowait(msg)
        return pending.queue

    def _send_cancel(self, request_id: str) -> None:
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
            self._route(data)

    def _drain_monitor(self) -> None:
        """Track the connection: a handshake means a worker; a disconnect means it is gone."""
        monitor = self._monitor
        while monitor is not None and monitor is self._monitor:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            event = int.from_bytes(frames[0][:2], "little")  # ZMTP monitor frame: u16 event
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED and self._connected:
                self._worker_lost(f"the worker at {self.endpoint} went away")
                return  # the monitor was replaced with the socket
            elif event & _HANDSHAKE_FAILED or event == zmq.EVENT_DISCONNECTED:
                # Closed before the handshake finished: the security settings disagree.
                # libzmq does not retry such a peer; the next request opens a fresh socket.
                self._refused = True
                self._fail_all(AuthenticationFailed(self._refusal_reason()))

    def _refusal_reason(self) -> str:
        if self.curve is None:
            how = "this client speaks plain ZMTP; the worker may require CurveZMQ keys"
        else:
            how = "wrong worker key, a client key the worker does not allow, or no Curve there"
        return f"the worker at {self.endpoint} refused the connection handshake ({how})"

    def _worker_lost(self, reason: str) -> None:
        """Fail every pending request and rebuild the socket for the next worker."""
        self._fail_all(WorkerUnavailable(reason))
        self._reset_socket()

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
        pending.last_heard = time.monotonic()
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
        """Enforce the two clocks liveness leaves to us: connecting, and per-request silence."""
        while True:
            await asyncio.sleep(0.05)
            if not self._pending:
                continue
            self._drain_monitor()  # a safety net for an edge the descriptor did not report
            now = time.monotonic()
            if not self._connected:
                self._fail_unconnected(now)
                continue
            for request_id, pending in list(self._pending.items()):
                limit = pending.timeout
                if limit is not None and now - pending.last_heard > limit:
                    self._pending.pop(request_id, None)
                    self._send_cancel(request_id)  # harmless if it was not a generate
                    pending.deliver(
                        RequestTimeout(f"no frame for request {request_id} in {limit} s")
                    )

    def _fail_unconnected(self, now: float) -> None:
        """Fail the requests that waited `timeout` for a connection (each from its own start)."""
        started = self._unconnected_since
        for request_id, pending in list(self._pending.items()):
            if now - max(pending.created, started) > self.timeout:
                self._pending.pop(request_id, None)
                pending.deliver(
                    WorkerUnavailable(
                        f"could not reach a worker at {self.endpoint} in {self.timeout} s"
                    )
                )
        if not self._pending:
            self._reset_socket()  # drop what was queued for nobody; reconnect afresh

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
        request_timeout: float | None = None,
    ) -> GenerationStream:
        """Stream a generation: `async for chunk in client.generate_stream(...)`.

        Give exactly one of `prompt`, `messages` (rendered by the worker's chat
        template with `options`) or `tokens`, else ValueError. Also an async
        context manager. Breaking out, `aclose()`, leaving the `async with`, or
        cancelling the task sends a cancel to the worker. `request_timeout`
        overrides the client's limit on this stream's silence.
        """
        self._check_open()
        # Generate checks its own rules (one of prompt/tokens/messages, the id): ValueError.
        msg = p.Generate(
            id=self._next_request_id() if request_id is None else request_id,
            prompt=prompt,
            tokens=list(tokens) if tokens is not None else None,
            messages=list(messages) if messages is not None else None,
            params=parameters or GenerationParameters(),
            options=options,
            add_special_tokens=add_special_tokens,
        )
        return GenerationStream(self, msg, request_timeout)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage] | None = None,
        tokens: Sequence[int] | None = None,
        parameters: GenerationParameters | None = None,
        options: ChatTemplateOptions | None = None,
        add_special_tokens: bool = True,
        request_id: str | None = None,
        request_timeout: float | None = None,
    ) -> GenerationResult:
        """Run a generation to the end and collect it (a collector over generate_stream)."""
        builder = ResultBuilder()
        stream = self.generate_stream(
            prompt,
            messages=messages,
            tokens=tokens,
            parameters=parameters,
            options=options,
            add_special_tokens=add_special_tokens,
            request_id=request_id,
            request_timeout=request_timeout,
        )
        async with stream:
            async for chunk in stream:
                builder.add(chunk)
        result = builder.result()
        if result is None:
            raise ProtocolError("the stream ended without a final chunk")
        return result

    async def cancel(self, request_id: str) -> None:
        """Cancel a request by id (harmless if it is unknown or already finished)."""
        self._ensure_started()
        self._send_cancel(request_id)

    async def ping(self) -> p.Pong:
        reply: p.Pong = await self._request(p.Ping(id=self._next_request_id()))
        return reply

    async def info(self) -> p.InfoReply:
        reply: p.InfoReply = await self._request(p.InfoRequest(id=self._next_request_id()))
        return reply

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        msg = p.TokenizeRequest(
            id=self._next_request_id(), text=text, add_special_tokens=add_special_tokens
        )
        reply: p.TokenizeReply = await self._request(msg)
        return list(reply.tokens)

    async def detokenize(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        msg = p.DetokenizeRequest(
            id=self._next_request_id(), tokens=list(tokens), skip_special_tokens=skip_special_tokens
        )
        reply: p.DetokenizeReply = await self._request(msg)
        return reply.text

    async def render(
        self, messages: Sequence[ChatMessage], options: ChatTemplateOptions | None = None
    ) -> p.RenderReply:
        """Render messages through the worker's chat template (text and token ids)."""
        msg = p.RenderRequest(id=self._next_request_id(), messages=list(messages), options=options)
        reply: p.RenderReply = await self._request(msg)
        return reply
