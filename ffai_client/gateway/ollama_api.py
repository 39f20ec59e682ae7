"""Ollama-compatible routes: /api/version, /api/tags, /api/ps, /api/show, /api/chat, /api/generate.

Streams are NDJSON (one JSON object a line; Ollama streams unless `stream`
is false); the last object has `done: true`, `done_reason` and the counts and
durations (nanoseconds). Errors are `{"error": "..."}` with an HTTP status.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ffai_client import __version__
from ffai_client.errors import FFAIError
from ffai_client.gateway import ollama_params as olp
from ffai_client.gateway.common import ClientGone, Run, dumps, gateway, read_body
from ffai_client.gateway.errors import ApiError, from_worker
from ffai_client.gateway.fields import Body
from ffai_client.gateway.generation import Event, Final, Job
from ffai_client.gateway.openai_params import fim_job
from ffai_client.gateway.toolcalls import ToolCall
from ffai_client.gateway.workers import WorkerHandle
from ffai_client.types import ChatMessage, ChatTemplateOptions

CLIENT_CLOSED = 499
_NEVER = "2999-01-01T00:00:00Z"  # a worker keeps its model loaded: it never expires


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _name(worker: WorkerHandle) -> str:
    return worker.model_id + ":latest"


class Reply:
    """Builds /api/chat or /api/generate objects from events."""

    def __init__(self, chat: bool, worker: WorkerHandle) -> None:
        self.chat = chat
        self.model = _name(worker)
        self.start = time.monotonic()
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def _obj(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = text
        return out

    def take(self, event: Event) -> dict[str, Any]:
        if isinstance(event, Final):
            return self.final(event, "", None)
        if isinstance(event, ToolCall):
            call = {
                "function": {"name": event.name, "arguments": json.loads(event.arguments or "{}")}
            }
            self.calls.append(call)
            return {**self._obj("", [call]), "done": False}
        self.text.append(event.text)
        return {**self._obj(event.text), "done": False}

    def final(self, event: Final, text: str, calls: list[dict[str, Any]] | None) -> dict[str, Any]:
        s = event.stats
        reason = "stop" if event.finish_reason == "tool_calls" else event.finish_reason
        return {
            **self._obj(text, calls),
            "done": True,
            "done_reason": reason,
            "total_duration": int((time.monotonic() - self.start) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": s.prompt_tokens,
            "prompt_eval_duration": int((s.queue_time_s + s.prefill_time_s) * 1e9),
            "eval_count": s.generated_tokens,
            "eval_duration": int(s.decode_time_s * 1e9),
        }

    def whole(self, events: list[Event]) -> dict[str, Any]:
        final = None
        for event in events:
            if isinstance(event, Final):
                final = event
            else:
                self.take(event)
        if final is None:
            raise ApiError(502, "the worker ended the stream early", type="server_error")
        return self.final(final, "".join(self.text), self.calls or None)


async def _ndjson(run: Run, reply: Reply) -> AsyncIterator[str]:
    try:
        async for _, event in run:
            yield dumps(reply.take(event)) + "\n"
    except FFAIError as exc:
        yield dumps(from_worker(exc).ollama_body()) + "\n"


async def _respond(
    request: Request, route: str, worker: WorkerHandle, job: Job, reply: Reply, body: Body
) -> Response:
    run = Run(request, route, worker, [job])
    try:
        await run.begin("messages" if reply.chat else "prompt")
        if body.flag("stream", True):
            return StreamingResponse(_ndjson(run, reply), media_type="application/x-ndjson")
        events = [event for _, event in await run.collect()]
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(reply.whole(events))


def _loaded(worker: WorkerHandle, chat: bool) -> Response:
    """An empty request only loads the model in Ollama: answer that it is loaded."""
    reply = Reply(chat, worker)
    return JSONResponse({**reply._obj(""), "done": True, "done_reason": "load"})


async def chat(request: Request) -> Response:
    body = await read_body(request)
    olp.check_unsupported(body)
    worker = await gateway(request).pool.route(body.text("model"))
    params = olp.parameters(body, worker)
    messages = olp.messages(body)
    if not messages:
        return _loaded(worker, chat=True)
    tools = olp.tools(body)
    options = ChatTemplateOptions(tools=tools, enable_thinking=_think(body))
    job = Job(
        parameters=params,
        messages=messages,
        options=options,
        tools=await worker.tool_format() if tools else None,
    )
    return await _respond(request, "/api/chat", worker, job, Reply(True, worker), body)


def _think(body: Body) -> bool | None:
    think = body.raw("think")
    if think is None or isinstance(think, bool):
        return think
    if think in ("low", "medium", "high"):
        return True
    raise ApiError(400, "think: must be true, false, low, medium or high", param="think")


async def generate(request: Request) -> Response:
    body = await read_body(request)
    olp.check_unsupported(body)
    worker = await gateway(request).pool.route(body.text("model"))
    params = olp.parameters(body, worker)
    prompt = body.text("prompt", "")
    suffix = body.text("suffix")
    assert prompt is not None and worker.info is not None
    if not prompt and not suffix:
        return _loaded(worker, chat=False)
    if suffix:
        job = await fim_job(worker, prompt, suffix, params)
    elif body.flag("raw") or not worker.info.has_chat_template:
        job = Job(parameters=params, prompt=prompt)
    else:
        system = body.text("system")
        messages = [ChatMessage(role="system", content=system)] if system else []
        messages.append(ChatMessage(role="user", content=prompt))
        options = ChatTemplateOptions(enable_thinking=_think(body))
        job = Job(parameters=params, messages=messages, options=options)
    return await _respond(request, "/api/generate", worker, job, Reply(False, worker), body)


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def _details(worker: WorkerHandle) -> dict[str, Any]:
    assert worker.info is not None
    family = worker.info.architecture.split(".")[0].lower()
    q = worker.info.quantization
    level = f"Q{q['bits']}" if q else worker.info.dtype.upper()
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": "",
        "quantization_level": level,
    }


def _entry(worker: WorkerHandle) -> dict[str, Any]:
    assert worker.info is not None
    digest = hashlib.sha256(worker.info.model.encode()).hexdigest()
    return {
        "name": _name(worker),
        "model": _name(worker),
        "modified_at": _now(),
        "size": 0,
        "digest": digest,
        "details": _details(worker),
    }


async def tags(request: Request) -> Response:
    workers = await gateway(request).pool.known()
    return JSONResponse({"models": [_entry(w) for w in workers]})


async def ps(request: Request) -> Response:
    workers = await gateway(request).pool.known()
    models = [
        {**_entry(w), "expires_at": _NEVER, "size_vram": w.info.kv_cache_bytes if w.info else 0}
        for w in workers
    ]
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    body = await read_body(request)
    name = body.text("model") or body.text("name")
    if not name:
        raise ApiError(400, "model: required", param="model")
    worker = await gateway(request).pool.route(name)
    info = worker.info
    assert info is not None
    family = _details(worker)["family"]
    return JSONResponse(
        {
            "license": "",
            "modelfile": "",
            "parameters": "",
            "template": await _template_sketch(worker),
            "details": _details(worker),
            "model_info": {
                "general.architecture": family,
                f"{family}.context_length": info.context_length,
            },
            "capabilities": await _capabilities(worker),
            "modified_at": _now(),
        }
    )


async def _render(worker: WorkerHandle, messages: list[ChatMessage], **opts: Any) -> str | None:
    try:
        return (await worker.client.render(messages, ChatTemplateOptions(**opts))).text
    except FFAIError:
        return None


async def _template_sketch(worker: WorkerHandle) -> str:
    """What the chat template makes of one system + user turn, with Ollama's placeholders.

    The worker's template is Jinja; this sketch shows its layout (not a Go template).
    """
    if worker.info is None or not worker.info.has_chat_template:
        return "{{ .Prompt }}"
    user = ChatMessage(role="user", content="{{ .Prompt }}")
    system = ChatMessage(role="system", content="{{ .System }}")
    return await _render(worker, [system, user]) or await _render(worker, [user]) or ""


async def _capabilities(worker: WorkerHandle) -> list[str]:
    caps = ["completion"]
    if worker.info is not None and worker.info.has_chat_template:
        probe = [ChatMessage(role="user", content="hi")]
        tool = {
            "type": "function",
            "function": {"name": "probe", "description": "probe", "parameters": {"type": "object"}},
        }
        plain = await _render(worker, probe)
        if plain is not None and await _render(worker, probe, tools=[tool]) not in (None, plain):
            caps.append("tools")
        on = await _render(worker, probe, enable_thinking=True)
        if on is not None and on != await _render(worker, probe, enable_thinking=False):
            caps.append("thinking")
    if await worker.fim_format() is not None:
        caps.append("insert")
    return caps
