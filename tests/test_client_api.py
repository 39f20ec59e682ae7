"""The public face of `ffai_client`: its exported names, typed signatures and closed clients."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import types
from typing import Any

import pytest
from conftest import free_tcp_endpoint

import ffai_client
from ffai_client import AsyncClient, Client, ClientClosed, WorkerUnavailable

# Pinned (httpx style): a name enters or leaves the public API only by editing this list.
PUBLIC_API = [
    "AsyncClient",
    "AuthenticationFailed",
    "Busy",
    "ChatMessage",
    "ChatTemplateOptions",
    "Client",
    "ClientClosed",
    "CurveClientKeys",
    "FFAIError",
    "GenerationChunk",
    "GenerationParameters",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "InfoReply",
    "InternalError",
    "InvalidParameters",
    "InvalidRequest",
    "Limits",
    "Pong",
    "PromptTooLong",
    "ProtocolError",
    "RenderReply",
    "RequestError",
    "RequestTimeout",
    "ShuttingDown",
    "SyncGenerationStream",
    "TemplateError",
    "UnsafeEndpoint",
    "Welcome",
    "WorkerUnavailable",
    "__version__",
    "default_endpoint",
    "resolve_endpoint",
]
CLIENT_METHODS = ["cancel", "detokenize", "generate", "generate_stream", "info", "ping", "render"]
CLIENT_METHODS += ["tokenize"]


def test_all_is_pinned_and_complete() -> None:
    assert ffai_client.__all__ == PUBLIC_API
    # Everything the package namespace offers without an underscore is in __all__ (modules aside).
    offered = {
        name
        for name, value in vars(ffai_client).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert offered | {"__version__"} == set(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(ffai_client, name) is not None


def test_internal_helpers_are_private() -> None:
    public = sorted(n for n in dir(AsyncClient) if not n.startswith("_"))
    assert public == sorted(["aclose", *CLIENT_METHODS])
    assert sorted(n for n in dir(Client) if not n.startswith("_")) == sorted(
        ["close", *CLIENT_METHODS]
    )


@pytest.mark.parametrize("name", ["generate", "generate_stream"])
def test_generate_signatures_are_explicit_and_the_same_sync_and_async(name: str) -> None:
    async_sig = inspect.signature(getattr(AsyncClient, name), eval_str=True)
    sync_sig = inspect.signature(getattr(Client, name), eval_str=True)
    for sig in (async_sig, sync_sig):
        kinds = {p.kind for p in sig.parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds
        assert inspect.Parameter.VAR_POSITIONAL not in kinds
        params = list(sig.parameters.values())[1:]  # after self
        assert all(p.annotation is not inspect.Parameter.empty for p in params)
    assert list(async_sig.parameters.values()) == list(sync_sig.parameters.values())
    assert list(async_sig.parameters)[1:] == [
        "prompt",
        "messages",
        "tokens",
        "parameters",
        "options",
        "add_special_tokens",
        "request_id",
        "request_timeout",
        "warm",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prompt": "a", "tokens": [1]}, {"tokens": [1], "messages": []}],
    ids=["none", "prompt+tokens", "tokens+messages"],
)
def test_generate_input_is_checked_before_anything_is_sent(kwargs: dict[str, Any]) -> None:
    client = AsyncClient(free_tcp_endpoint())
    with pytest.raises(ValueError, match="exactly one of prompt, tokens or messages"):
        client.generate_stream(**kwargs)
    for bad_id in ("", "é" * 129):
        with pytest.raises(ValueError, match="id must be 1 to 256 bytes"):
            client.generate_stream("x", request_id=bad_id)


def test_closing_fails_pending_requests_and_later_calls_with_client_closed() -> None:
    async def main() -> None:
        client = AsyncClient(free_tcp_endpoint(), timeout=60)
        await client.__aenter__()
        pending = asyncio.create_task(client.generate("Once upon a time"))
        ping = asyncio.create_task(client.ping())
        await asyncio.sleep(0.2)
        assert not pending.done() and not ping.done()  # waiting for a worker that is not there
        started = time.monotonic()
        await client.aclose()
        for task in (pending, ping):
            with pytest.raises(ClientClosed) as info:
                await task
            assert not isinstance(info.value, WorkerUnavailable)
        assert time.monotonic() - started < 2
        with pytest.raises(ClientClosed):
            client.generate_stream("again")
        with pytest.raises(ClientClosed):
            await client.ping()
        with pytest.raises(ClientClosed):
            await client.tokenize("x")
        with pytest.raises(ClientClosed):
            async with client:
                pass
        await client.aclose()  # idempotent

    asyncio.run(main())


def test_sync_client_closed_and_reused() -> None:
    client = Client(free_tcp_endpoint(), timeout=60)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            client.generate("Once upon a time")
        except BaseException as exc:  # the test inspects what came out
            errors.append(exc)

    waiter = threading.Thread(target=wait_forever)
    waiter.start()
    time.sleep(0.2)
    client.close()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClientClosed), errors
    for call in (
        client.ping,
        lambda: client.generate("x"),
        lambda: client.generate_stream("x"),
        lambda: client.tokenize("x"),
        client.__enter__,
    ):
        with pytest.raises(ClientClosed):
            call()
    client.close()  # idempotent
