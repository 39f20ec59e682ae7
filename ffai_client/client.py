"""`AsyncClient`: one or many workers, many concurrent requests multiplexed by id.

Each worker gets one `Connection` (ffai_client/connection.py: a DEALER socket
watched by the event loop, with ZMTP heartbeats and a socket monitor); with
several, a `Router` (ffai_client/pool.py) picks one per request by load with
prefix affinity and moves requests that had no answer yet off a lost worker.
`timeout` bounds only the wait for a connection; `request_timeout` (off by
default) bounds the silence of one request, for hangs, and is never mistaken
for death.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ffai_client import protocol as p
from ffai_client.connection import Pending, Settings
from ffai_client.curve import CurveClientKeys
from ffai_client.errors import ClientClosed, ProtocolError
from ffai_client.pool import (
    DEFAULT_RESOLVE_INTERVAL,
    RECONNECT_MAX_MS,
    Resolver,
    Router,
    affinity_key,
    dns_target,
    resolve_addresses,
    split_endpoints,
)
from ffai_client.stream import GenerationStream
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationParameters,
    GenerationResult,
    ResultBuilder,
)

DEFAULT_TIMEOUT = 5.0  # seconds a request waits for a connection to a worker
DEFAULT_HEARTBEAT = 1.0  # ZMTP heartbeat interval; a silent peer is dropped after 3 of them
_WATCHDOG_S = 0.05


class AsyncClient:
    """Talks to one worker or spreads requests over several. Safe to share across
    tasks of one event loop.

    `endpoint`: one endpoint, several (a list, or a comma-separated string), or
    `tcp://NAME:PORT` where NAME resolves to several addresses (re-resolved
    every `resolve_interval` seconds; `resolver(host, port)` returns the
    addresses, default: the system's). With several workers a generation goes
    to the worker that holds its prompt's prefix unless that one is much busier
    than the rest, a lost worker leaves rotation, and requests with no answer
    yet move to another worker. `timeout`: how long a request may wait for a
    connection to a worker. `heartbeat_interval`: ZMTP heartbeat period; a
    frozen worker is dropped after three silent intervals. `request_timeout`:
    the longest silence one request tolerates before `RequestTimeout` (None:
    wait as long as the worker is alive). `curve`: CurveZMQ keys (default: from
    FFAI_CURVE_SERVER_KEY and FFAI_CURVE_KEY when set); a refused handshake
    fails requests at once with `AuthenticationFailed`.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT,
        request_timeout: float | None = None,
        curve: CurveClientKeys | None = None,
        resolver: Resolver | None = None,
        resolve_interval: float = DEFAULT_RESOLVE_INTERVAL,
    ) -> None:
        targets = split_endpoints(endpoint)
        self.endpoint = ",".join(targets)
        self.curve = curve if curve is not None else CurveClientKeys.from_env()
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.request_timeout = request_timeout
        self.welcome: p.Welcome | None = None
        several = len(targets) > 1 or any(dns_target(t) for t in targets)
        settings = Settings(
            timeout=timeout,
            heartbeat_interval=heartbeat_interval,
            curve=self.curve,
            # One worker keeps libzmq's steady 100 ms retry; among several, a dead
            # one is retried with backoff while the others serve.
            reconnect_max_ms=RECONNECT_MAX_MS if several else 0,
        )
        self._router = Router(
            targets, settings, resolver or resolve_addresses, resolve_interval, self._welcomed
        )
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{os.urandom(3).hex()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def _welcomed(self, welcome: p.Welcome) -> None:
        self.welcome = welcome

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> AsyncClient:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail pending requests with `ClientClosed`, stop the watchdog, close the sockets.

        Idempotent; any later call on this client raises `ClientClosed`.
        """
        self._closed = True
        await self._router.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this client is closed; create a new one")

    def _ensure_started(self) -> None:
        self._check_open()
        if not self._router.started:
            self._router.start(asyncio.get_running_loop(), f"{self._prefix}-load")
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._watchdog(), name="ffai-watchdog")]

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_S)
            self._router.tick(time.monotonic())

    # -- plumbing --------------------------------------------------------------
    def _next_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _forget(self, request_id: str) -> None:
        self._router.forget(request_id)

    async def _request(self, msg: Any) -> Any:
        """Send one request and wait for its single reply frame."""
        self._ensure_started()
        pending = Pending(msg, streaming=False, timeout=self.request_timeout, key=None)
        self._router.submit(pending)
        assert pending.future is not None
        try:
            return await pending.future
        finally:
            self._forget(msg.id)

    def _open_stream(self, msg: p.Generate, request_timeout: float | None = None) -> Pending:
        """Register a generate and send it; its frames arrive on the returned `queue`."""
        self._ensure_started()
        if self._router.find(msg.id) is not None:
            raise ValueError(f"request id {msg.id!r} is already in use on this client")
        timeout = self.request_timeout if request_timeout is None else request_timeout
        pending = Pending(msg, streaming=True, timeout=timeout, key=affinity_key(msg))
        self._router.submit(pending)
        return pending

    def _send_cancel(self, request_id: str) -> None:
        """Tell the worker to stop `request_id`; idempotent, never blocks."""
        self._router.cancel(request_id)

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
        warm: bool = False,
    ) -> GenerationStream:
        """Stream a generation: `async for chunk in client.generate_stream(...)`.

        Give exactly one of `prompt`, `messages` (rendered by the worker's chat
        template with `options`) or `tokens`, else ValueError. Also an async
        context manager. Breaking out, `aclose()`, leaving the `async with`, or
        cancelling the task sends a cancel to the worker. `request_timeout`
        overrides the client's limit on this stream's silence. `warm`: prefill
        only, so a later request sharing the prompt starts from the worker's
        prefix cache (one final chunk with stats, no tokens).
        """
        self._check_open()
        if warm:  # an older worker ignores `warm`: then it generates one token at most
            parameters = replace(parameters or GenerationParameters(), max_tokens=1)
        # Generate checks its own rules (one of prompt/tokens/messages, the id): ValueError.
        msg = p.Generate(
            id=self._next_request_id() if request_id is None else request_id,
            prompt=prompt,
            tokens=list(tokens) if tokens is not None else None,
            messages=list(messages) if messages is not None else None,
            params=parameters or GenerationParameters(),
            options=options,
            add_special_tokens=add_special_tokens,
            warm=warm,
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
        warm: bool = False,
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
            warm=warm,
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
