"""Prometheus metrics of the gateway (one registry per app, so tests can run several)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ffai_client.gateway.workers import WorkerPool

ROUTES = (
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/api/version",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/chat",
    "/api/generate",
    "/metrics",
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ffai_gateway_requests",
            "HTTP requests by route and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "ffai_gateway_time_to_first_token_seconds",
            "Request arrival to first text",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ffai_gateway_request_duration_seconds",
            "Request arrival to response end",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ffai_gateway_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.completion_tokens = Counter(
            "ffai_gateway_completion_tokens", "Generated tokens of finished requests", registry=r
        )
        self.cancels = Counter(
            "ffai_gateway_cancels",
            "Generations cancelled because the HTTP client left",
            registry=r,
        )
        labels = ["model"]
        self.worker_up = Gauge(
            "ffai_worker_up", "1 if the worker answered info", labels, registry=r
        )
        self.worker_running = Gauge(
            "ffai_worker_running", "Sequences being decoded", labels, registry=r
        )
        self.worker_waiting = Gauge(
            "ffai_worker_waiting", "Requests waiting for a batch slot", labels, registry=r
        )
        self.worker_kv = Gauge(
            "ffai_worker_kv_cache_bytes", "KV cache bytes allocated", labels, registry=r
        )
        self.worker_frames = Gauge(
            "ffai_worker_frames_sent",
            "Frames the worker sent since it started",
            labels,
            registry=r,
        )

    async def render(self, pool: WorkerPool) -> bytes:
        """The exposition text, after asking every worker for its counters."""
        answers = await asyncio.gather(*(w.refresh() for w in pool.workers), return_exceptions=True)
        for worker, answer in zip(pool.workers, answers, strict=True):
            model = worker.model_id
            # A worker that did not answer keeps its last figures but shows as down.
            self.worker_up.labels(model).set(0 if isinstance(answer, BaseException) else 1)
            info = worker.info
            if info is None:
                continue
            self.worker_running.labels(model).set(info.running)
            self.worker_waiting.labels(model).set(info.waiting)
            self.worker_kv.labels(model).set(info.kv_cache_bytes)
            if info.frames_sent is not None:
                self.worker_frames.labels(model).set(info.frames_sent)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response by route and status, and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ROUTES else "other"
        start = time.monotonic()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
