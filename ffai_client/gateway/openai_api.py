"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Streams are Server-Sent Events ending with `data: [DONE]`; with
`stream_options.include_usage` every chunk carries `usage: null` and one last
chunk has `choices: []` and the usage. Errors use OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`); an error after the
stream began is sent as one such event and the stream ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ffai_client.errors import FFAIError
from ffai_client.gateway import openai_params as op
from ffai_client.gateway.common import ClientGone, Run, dumps, gateway, read_body
from ffai_client.gateway.errors import ApiError, from_worker
from ffai_client.gateway.generation import Job
from ffai_client.gateway.openai_shape import Shape
from ffai_client.gateway.workers import WorkerHandle

SSE_PING_S = 15  # a comment line keeps idle proxies from closing a slow prefill's stream
CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it


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
    plan = await op.chat_plan(body, worker)
    shape = Shape(True, worker.model_id, plan.groups, plan.include_usage)
    return await _respond(
        request,
        "/v1/chat/completions",
        worker,
        plan.jobs,
        shape,
        body.flag("stream"),
        "messages",
    )


async def completions(request: Request) -> Response:
    body = await read_body(request)
    op.check_unsupported(body)
    worker = await gateway(request).pool.route(body.text("model"))
    plan = await op.completion_plan(body, worker)
    shape = Shape(False, worker.model_id, plan.groups, plan.include_usage)
    return await _respond(
        request, "/v1/completions", worker, plan.jobs, shape, body.flag("stream"), "prompt"
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
