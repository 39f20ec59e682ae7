"""The gateway's ASGI app: routes, and the layers every request passes through.

Outermost first: CORS (only with `cors_origins`), metrics (status and
duration of every response), the API key check (only with `api_key`), and
the body size limit. Errors are rendered in the shape of the API the path
belongs to: `/api/...` is Ollama's, everything else OpenAI's.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ffai_client.gateway import ollama_api, openai_api
from ffai_client.gateway.common import GatewayState, gateway
from ffai_client.gateway.errors import ApiError
from ffai_client.gateway.metrics import Metrics, MetricsMiddleware
from ffai_client.gateway.workers import WorkerPool

DEFAULT_MAX_BODY = 8 << 20  # bytes; a long chat with tools is well under this


@dataclass
class GatewayConfig:
    workers: list[str]
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY
    connect_timeout: float = 5.0


def _error_response(path: str, error: ApiError) -> Response:
    body = error.ollama_body() if path.startswith("/api/") else error.openai_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def _send_error(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    await _error_response(scope["path"], error)(scope, receive, send)


class BodyLimit:
    """Reads the whole body up front (at most `limit` bytes, else 413) and replays it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = ApiError(
            413, f"the request body is larger than {self.limit} bytes", code="request_too_large"
        )
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_error(scope, receive, send, too_big)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _send_error(scope, receive, send, too_big)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKey:
    """Requires `Authorization: Bearer <key>` on every request (OPTIONS preflights aside)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        if not hmac.compare_digest(given, self.key):
            error = ApiError(
                401,
                "a valid API key is needed: Authorization: Bearer <key>",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await _send_error(scope, receive, send, error)
            return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    error = ApiError(
        exc.status_code,
        f"{request.method} {request.url.path}: {exc.detail}",
        code=code,
        headers=dict(exc.headers or {}),
    )
    return _error_response(request.url.path, error)


async def _metrics(request: Request) -> Response:
    state = gateway(request)
    text = await state.metrics.render(state.pool)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _root(request: Request) -> Response:
    return Response("ffai-gateway is running\n", media_type="text/plain")


ROUTES = [
    Route("/", _root),
    Route("/v1/models", openai_api.list_models),
    Route("/v1/models/{model:path}", openai_api.get_model),
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_api.completions, methods=["POST"]),
    Route("/api/version", ollama_api.version),
    Route("/api/tags", ollama_api.tags),
    Route("/api/ps", ollama_api.ps),
    Route("/api/show", ollama_api.show, methods=["POST"]),
    Route("/api/chat", ollama_api.chat, methods=["POST"]),
    Route("/api/generate", ollama_api.generate, methods=["POST"]),
    Route("/metrics", _metrics),
]


def create_app(config: GatewayConfig) -> Starlette:
    """The gateway app; its lifespan connects to the workers and learns their models."""
    state = GatewayState(pool=WorkerPool(config.workers, config.connect_timeout), metrics=Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.pool.start()
        try:
            yield
        finally:
            await state.pool.close()

    middleware: list[Middleware] = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=config.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    middleware.append(Middleware(MetricsMiddleware, metrics=state.metrics))
    if config.api_key:
        middleware.append(Middleware(ApiKey, key=config.api_key))
    middleware.append(Middleware(BodyLimit, limit=config.max_body_bytes))
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.gateway = state
    return app
