"""What the OpenAI and Ollama routes share: the app's state, body reading, starting a stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from ffai_client.errors import FFAIError
from ffai_client.gateway.errors import ApiError, from_worker
from ffai_client.gateway.fields import Body, parse_json_object
from ffai_client.gateway.generation import (
    ClientGone,
    Event,
    Final,
    Job,
    merge,
    run_job,
    until_disconnect,
)
from ffai_client.gateway.metrics import Metrics
from ffai_client.gateway.toolcalls import TextDelta, ToolCall
from ffai_client.gateway.workers import WorkerHandle, WorkerPool


@dataclass
class GatewayState:
    pool: WorkerPool
    metrics: Metrics


def gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def read_body(request: Request) -> Body:
    return Body(parse_json_object(await request.body()))


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Run:
    """The events of one HTTP request's jobs, started: the first event is already in hand.

    Waiting for the first event before answering lets worker errors (busy,
    prompt too long, bad parameters) become HTTP statuses; a client that
    leaves meanwhile raises `ClientGone` after its jobs were cancelled.
    """

    def __init__(self, request: Request, route: str, worker: WorkerHandle, jobs: list[Job]) -> None:
        self.request = request
        self.route = route
        self.state = gateway(request)
        self.start = time.monotonic()
        metrics = self.state.metrics
        self.events: AsyncGenerator[tuple[int, Event]] = merge(
            [run_job(worker, j, metrics.cancels.inc) for j in jobs]
        )
        self.first: tuple[int, Event] | None = None
        self._ttft_seen = False

    async def begin(self, input_field: str) -> None:
        try:
            self.first = await until_disconnect(self.request, anext(self.events))
        except FFAIError as exc:
            raise from_worker(exc, input_field) from None
        except StopAsyncIteration:
            raise ApiError(502, "the worker ended the stream early", type="server_error") from None

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event, the first included; FFAIError escapes for the route to render."""
        try:
            if self.first is not None:
                self._observe(self.first[1])
                yield self.first
            async for item in self.events:
                self._observe(item[1])
                yield item
        finally:
            await self.events.aclose()

    async def collect(self) -> list[tuple[int, Event]]:
        """All events, for a buffered answer (the client leaving cancels: ClientGone)."""

        async def gather() -> list[tuple[int, Event]]:
            return [item async for item in self]

        try:
            return await until_disconnect(self.request, gather())
        except FFAIError as exc:
            raise from_worker(exc) from None

    def _observe(self, event: Event) -> None:
        metrics = self.state.metrics
        if not self._ttft_seen and isinstance(event, (TextDelta, ToolCall)):
            self._ttft_seen = True
            metrics.ttft.labels(self.route).observe(time.monotonic() - self.start)
        elif isinstance(event, Final):
            metrics.prompt_tokens.inc(event.stats.prompt_tokens)
            metrics.completion_tokens.inc(event.stats.generated_tokens)


__all__ = ["ClientGone", "GatewayState", "Run", "dumps", "gateway", "read_body"]
