"""`Client`: the blocking facade for scripts, a thin wrapper over `AsyncClient`.

It owns a private event loop on a daemon thread and runs the async client's
coroutines there; nothing about the protocol is implemented twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from ffai_client import protocol as p
from ffai_client.client import DEFAULT_HEARTBEAT, DEFAULT_TIMEOUT, AsyncClient
from ffai_client.curve import CurveClientKeys
from ffai_client.errors import ClientClosed
from ffai_client.pool import DEFAULT_RESOLVE_INTERVAL, Resolver
from ffai_client.stream import GenerationStream
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationChunk,
    GenerationParameters,
    GenerationResult,
)

T = TypeVar("T")


class Client:
    """Blocking client: the same methods and arguments as `AsyncClient`, with plain iterators."""

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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="ffai")
        self._thread.start()
        self._async = AsyncClient(
            endpoint,
            timeout=timeout,
            heartbeat_interval=heartbeat_interval,
            request_timeout=request_timeout,
            curve=curve,
            resolver=resolver,
            resolve_interval=resolve_interval,
        )
        self.endpoint = self._async.endpoint

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()  # never awaited: say so quietly, not with a RuntimeWarning
            raise ClientClosed("this client is closed; create a new one")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        if self._loop.is_closed():
            raise ClientClosed("this client is closed; create a new one")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client (idempotent); later calls raise `ClientClosed`."""
        if self._loop.is_closed():
            return
        self._run(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

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
    ) -> SyncGenerationStream:
        """Stream a generation: `for chunk in client.generate_stream(...)` (see AsyncClient)."""
        if self._loop.is_closed():
            raise ClientClosed("this client is closed; create a new one")
        stream = self._async.generate_stream(
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
        return SyncGenerationStream(self, stream)

    def generate(
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
        """Run a generation to the end and collect it."""
        return self._run(
            self._async.generate(
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
        )

    def cancel(self, request_id: str) -> None:
        self._run(self._async.cancel(request_id))

    def ping(self) -> p.Pong:
        return self._run(self._async.ping())

    def info(self) -> p.InfoReply:
        return self._run(self._async.info())

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._run(self._async.tokenize(text, add_special_tokens=add_special_tokens))

    def detokenize(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._run(self._async.detokenize(tokens, skip_special_tokens=skip_special_tokens))

    def render(
        self, messages: Sequence[ChatMessage], options: ChatTemplateOptions | None = None
    ) -> p.RenderReply:
        return self._run(self._async.render(messages, options))


class SyncGenerationStream:
    """A plain iterator over one generation's chunks; `close()` or `with` cancels it."""

    def __init__(self, client: Client, stream: GenerationStream) -> None:
        self._client = client
        self._stream = stream

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def final(self) -> GenerationChunk | None:
        return self._stream.final

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self

    def __next__(self) -> GenerationChunk:
        try:
            return self._client._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __enter__(self) -> SyncGenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def cancel(self) -> None:
        self._client._run(self._stream.cancel())

    def close(self) -> None:
        self._client._run(self._stream.aclose())
