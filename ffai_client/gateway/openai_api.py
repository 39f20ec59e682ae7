"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Streams are Server-Sent Events ending with `data: [DONE]`; with
`stream_options.include_usage` every chunk carries `usage: null` and one last
chunk has `choices: []` and the usage. Errors use OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`); an error after the
stream began is sent as one such event and the stream ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ffai_client.errors import FFAIError
from ffai_client.gateway import openai_params as op
from ffai_client.gateway.common import ClientGone, Run, dumps, gateway, read_body
from ffai_client.gateway.errors import ApiError, from_worker
from ffai_client.gateway.generation import Event, Final, Job
from ffai_client.gateway.toolcalls import ToolCall
from ffai_client.gateway.workers import WorkerHandle

SSE_PING_S = 15  # a comment line keeps idle proxies from closing a slow prefill's stream
CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it


@dataclass
class Choice:
    """What one choice has collected so far."""

    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    final: Final | None = None


class Shape:
    """How one request's events become OpenAI objects (chat or text completion)."""

    def __init__(self, chat: bool, model: str, groups: list[int], include_usage: bool) -> None:
        self.chat = chat
        self.model = model
        self.groups = groups  # choice index → which prompt it samples (usage counts each once)
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.choices = [Choice() for _ in groups]

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        out: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if chunk and self.include_usage:
            out["usage"] = None
        return out

    def take(self, index: int, event: Event) -> dict[str, Any] | None:
        """Record an event; return its streamed choice delta."""
        choice = self.choices[index]
        if isinstance(event, Final):
            choice.final = event
            return self._delta(index, {}, "", event.finish_reason)
        if isinstance(event, ToolCall):
            call = {
                "id": "call_" + os.urandom(12).hex(),
                "type": "function",
                "function": {"name": event.name, "arguments": event.arguments},
            }
            choice.calls.append(call)
            return self._delta(index, {"tool_calls": [{"index": len(choice.calls) - 1, **call}]})
        choice.text.append(event.text)
        return self._delta(index, {"content": event.text}, event.text)

    def _delta(
        self, index: int, delta: dict[str, Any], text: str = "", finish: str | None = None
    ) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def usage(self) -> dict[str, Any]:
        prompt = cached = completion = 0
        seen: set[int] = set()
        for group, choice in zip(self.groups, self.choices, strict=True):
            if choice.final is None:
                continue
            stats = choice.final.stats
            completion += stats.generated_tokens
            if group not in seen:
                seen.add(group)
                prompt += stats.prompt_tokens
                cached += stats.cached_prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def whole(self) -> dict[str, Any]:
        """The buffered answer."""
        out = []
        for i, c in enumerate(self.choices):
            reason = c.final.finish_reason if c.final else "stop"
            text = "".join(c.text)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text or None}
                if c.calls:
                    message["tool_calls"] = c.calls
                else:
                    message["content"] = text
                out.append(
                    {"index": i, "message": message, "logprobs": None, "finish_reason": reason}
                )
            else:
                out.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        return {**self.envelope(out, chunk=False), "usage": self.usage()}


async def _sse(run: Run, shape: Shape) -> AsyncIterator[dict[str, str]]:
    if shape.chat:
        roles = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(len(shape.choices))
        ]
        yield {"data": dumps(shape.envelope(roles, chunk=True))}
    try:
        async for index, event in run:
            delta = shape.take(index, event)
            if delta is not None:
                yield {"data": dumps(shape.envelope([delta], chunk=True))}
    except FFAIError as exc:
        yield {"data": dumps(from_worker(exc).openai_body())}
        return
    if shape.include_usage:
        yield {"data": dumps({**shape.envelope([], chunk=True), "usage": shape.usage()})}
    yield {"data": "[DONE]"}


async def _respond(
    request: Request,
    route: str,
    worker: WorkerHandle,
    jobs: list[Job],
    shape: Shape,
    stream: bool,
    input_field: str,
) -> Response:
    run = Run(request, route, worker, jobs)
    try:
        await run.begin(input_field)
        if stream:
            return EventSourceResponse(_sse(run, shape), ping=SSE_PING_S, sep="\n")
        for index, event in await run.collect():
            shape.take(index, event)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(shape.whole())


async def chat_completions(request: Request) -> Response:
    body = await read_body(request)
    op.check_unsupported(body)
    worker = await gateway(request).pool.route(body.text("model"))
    params = op.sampling(body, op.default_max_tokens(worker), chat=True)
    n = op.choices(body)
    include_usage = op.stream_usage(body)
    messages = op.chat_messages(body)
    tools, extra = op.tool_options(body)
    job = Job(
        parameters=params,
        messages=messages,
        options=op.template_options(tools, extra),
        tools=await worker.tool_format() if tools else None,
    )
    shape = Shape(True, worker.model_id, [0] * n, include_usage)
    return await _respond(
        request,
        "/v1/chat/completions",
        worker,
        op.seeded(job, n),
        shape,
        body.flag("stream"),
        "messages",
    )


async def completions(request: Request) -> Response:
    body = await read_body(request)
    op.check_unsupported(body)
    worker = await gateway(request).pool.route(body.text("model"))
    params = op.sampling(body, op.default_max_tokens(worker), chat=False)
    n = op.choices(body)
    include_usage = op.stream_usage(body)
    prompts = op.completion_prompts(body)
    suffix = body.text("suffix")
    echo = body.flag("echo")
    jobs: list[Job] = []
    groups: list[int] = []
    for g, prompt in enumerate(prompts):
        if suffix is not None:
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt: must be a string with suffix", param="prompt")
            job = await op.fim_job(worker, prompt, suffix, params)
        elif isinstance(prompt, str):
            job = Job(parameters=params, prompt=prompt, echo=prompt if echo else "")
        else:
            echoed = await worker.client.detokenize(prompt) if echo else ""
            job = Job(parameters=params, tokens=prompt, echo=echoed)
        jobs += op.seeded(job, n)
        groups += [g] * n
    shape = Shape(False, worker.model_id, groups, include_usage)
    return await _respond(
        request, "/v1/completions", worker, jobs, shape, body.flag("stream"), "prompt"
    )


def _model_card(worker: WorkerHandle) -> dict[str, Any]:
    return {"id": worker.model_id, "object": "model", "created": 0, "owned_by": "ffai"}


async def list_models(request: Request) -> Response:
    workers = await gateway(request).pool.known()
    return JSONResponse({"object": "list", "data": [_model_card(w) for w in workers]})


async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    for worker in await gateway(request).pool.known():
        if worker.answers_to(name):
            return JSONResponse(_model_card(worker))
    raise ApiError(
        404,
        f"model {name!r} is not served here",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )
