"""OpenAI request bodies → worker jobs: sampling fields, chat messages, tools, FIM.

Every field we cannot honour is refused with a 400 that names it, never
ignored: `logprobs`, `top_logprobs`,
`tool_choice` that forces a call, `best_of` other than `n`, and the rest in
`_UNSUPPORTED`. Extensions other servers accept too (vLLM's `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `chat_template_kwargs`) are honoured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from ffai_client.gateway.errors import ApiError, bad_field, unsupported
from ffai_client.gateway.fields import Body, build_parameters
from ffai_client.gateway.generation import Job
from ffai_client.gateway.workers import WorkerHandle
from ffai_client.types import ChatMessage, ChatTemplateOptions, GenerationParameters

MAX_N = 16  # choices per request; each one is a separate sequence on the worker
_NO_LOGPROBS = "the worker does not return log-probabilities yet"
_UNSUPPORTED = {
    "audio": "the worker generates text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "the gateway has no web search",
    "functions": "use `tools` (the legacy `functions` field is not accepted)",
    "function_call": "use `tool_choice` (the legacy `function_call` field is not accepted)",
}


@dataclass(frozen=True)
class Plan:
    """What one OpenAI body asks of a worker: its jobs, and which prompt each one samples."""

    jobs: list[Job]
    groups: list[int]  # choice index → prompt index (usage counts each prompt once)
    include_usage: bool  # stream_options.include_usage


async def chat_plan(body: Body, worker: WorkerHandle) -> Plan:
    """A /v1/chat/completions body (already through `check_unsupported`) as worker jobs."""
    params = sampling(body, default_max_tokens(worker), chat=True)
    n = choices(body)
    include_usage = stream_usage(body)
    messages = chat_messages(body)
    tools, extra = tool_options(body)
    job = Job(
        parameters=params,
        messages=messages,
        options=template_options(tools, extra),
        tools=await worker.tool_format() if tools else None,
    )
    return Plan(seeded(job, n), [0] * n, include_usage)


async def completion_plan(body: Body, worker: WorkerHandle) -> Plan:
    """A /v1/completions body (already through `check_unsupported`) as worker jobs."""
    params = sampling(body, default_max_tokens(worker), chat=False)
    n = choices(body)
    include_usage = stream_usage(body)
    prompts = completion_prompts(body)
    suffix = body.text("suffix")
    echo = body.flag("echo")
    jobs: list[Job] = []
    groups: list[int] = []
    for g, prompt in enumerate(prompts):
        if suffix is not None:
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt: must be a string with suffix", param="prompt")
            job = await fim_job(worker, prompt, suffix, params)
        elif isinstance(prompt, str):
            job = Job(parameters=params, prompt=prompt, echo=prompt if echo else "")
        else:
            echoed = await worker.client.detokenize(prompt) if echo else ""
            job = Job(parameters=params, tokens=prompt, echo=echoed)
        jobs += seeded(job, n)
        groups += [g] * n
    return Plan(jobs, groups, include_usage)


def check_unsupported(body: Body) -> None:
    """400 for fields we cannot honour, named; harmless values (false, 0, text) pass."""
    if body.raw("logprobs") not in (None, False, 0):
        raise unsupported("logprobs", _NO_LOGPROBS)
    if body.raw("top_logprobs") not in (None, 0):
        raise unsupported("top_logprobs", _NO_LOGPROBS)
    modalities = body.raw("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", "the worker generates text only")
    for name, why in _UNSUPPORTED.items():
        if body.has(name):
            raise unsupported(name, why)


def sampling(body: Body, info_max_tokens: int, chat: bool) -> GenerationParameters:
    """The generation parameters of an OpenAI body (chat or completions)."""
    max_tokens = body.integer("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.integer("max_tokens")
    logit_bias: dict[int, float] = {}
    for key, bias in (body.obj("logit_bias") or {}).items():
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise bad_field("logit_bias", f"the bias for {key!r} must be a number")
        try:
            logit_bias[int(key)] = float(bias)
        except ValueError:
            raise bad_field("logit_bias", f"keys must be token ids, got {key!r}") from None
    seed = body.integer("seed")
    names = {
        "max_tokens": "max_completion_tokens"
        if body.has("max_completion_tokens")
        else "max_tokens",
        "repetition_penalty": "repetition_penalty",
    }
    return build_parameters(
        names,
        max_tokens=info_max_tokens if max_tokens is None else max_tokens,
        temperature=body.number("temperature"),
        top_p=body.number("top_p", 1.0),
        top_k=body.integer("top_k", 0),
        min_p=body.number("min_p", 0.0),
        repetition_penalty=body.number("repetition_penalty", 1.0),
        presence_penalty=body.number("presence_penalty", 0.0),
        frequency_penalty=body.number("frequency_penalty", 0.0),
        logit_bias=logit_bias,
        seed=None if seed is None else seed % 2**64,  # OpenAI takes any int64
        stop=body.stop(),
        stop_on_eos=not body.flag("ignore_eos"),
        response_format=_response_format(body),
    )


def _response_format(body: Body) -> dict[str, Any] | None:
    """OpenAI's `response_format`, passed to the worker as is (it speaks the same form)."""
    fmt = body.raw("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict):
        raise bad_field("response_format", "must be an object with a `type`")
    return fmt


def choices(body: Body) -> int:
    """`n`, checked; `best_of` only as a synonym of n (we return every sample)."""
    n = body.integer("n", 1)
    assert n is not None
    if not 1 <= n <= MAX_N:
        raise bad_field("n", f"must be between 1 and {MAX_N}, got {n}")
    best_of = body.integer("best_of")
    if best_of is not None and best_of != n:
        raise unsupported("best_of", "choosing the best of several samples needs log-probabilities")
    return n


def seeded(job: Job, n: int) -> list[Job]:
    """`n` copies of a job, the i-th with seed + i (when a seed was given)."""
    seed = job.parameters.seed
    if n == 1 or seed is None:
        return [job] * n
    return [
        replace(job, parameters=replace(job.parameters, seed=(seed + i) % 2**64)) for i in range(n)
    ]


def stream_usage(body: Body) -> bool:
    """`stream_options.include_usage`; stream_options only with stream."""
    opts = body.obj("stream_options")
    if opts is None:
        return False
    if not body.flag("stream"):
        raise bad_field("stream_options", "is only allowed when stream is true")
    value = opts.get("include_usage", False)
    if not isinstance(value, bool):
        raise bad_field("stream_options.include_usage", "must be true or false")
    return value


def chat_messages(body: Body) -> list[ChatMessage]:
    raw = body.array("messages")
    if not raw:
        raise bad_field("messages", "must be a non-empty array", "missing_required_parameter")
    return [chat_message(m, f"messages[{i}]") for i, m in enumerate(raw)]


def chat_message(m: Any, where: str) -> ChatMessage:
    """An OpenAI message as the template expects it (tool call arguments as objects)."""
    if not isinstance(m, dict):
        raise bad_field(where, "must be an object")
    role = m.get("role")
    if role == "developer":
        role = "system"  # templates know system, not OpenAI's newer name for it
    if role not in ("system", "user", "assistant", "tool"):
        raise bad_field(
            f"{where}.role", f"must be system, developer, user, assistant or tool, got {role!r}"
        )
    content = message_text(m.get("content"), f"{where}.content")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise bad_field(f"{where}.tool_calls", "must be an array")
        calls = [_template_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise bad_field(f"{where}.{key}", "must be a string")
    return ChatMessage(
        role=role,
        content=content,
        tool_calls=calls or None,
        tool_call_id=m.get("tool_call_id"),
        name=m.get("name"),
    )


def message_text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or text parts joined; other parts are refused."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_field(where, "must be a string or an array of content parts")
    texts: list[str] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
            raise unsupported(f"{where}[{i}]", f"content parts of type {kind!r} (text only)")
        texts.append(part["text"])
    return "".join(texts)


def _template_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_field(where, "needs function.name")
    args: Any = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise bad_field(f"{where}.function.arguments", "must be JSON") from None
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tool_options(body: Body) -> tuple[list[Any] | None, dict[str, Any]]:
    """(tools for the template, or None) and the template's extra keywords."""
    extra = dict(body.obj("chat_template_kwargs") or {})
    tools = body.array("tools")
    choice = body.raw("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise unsupported(
            "tool_choice", "forcing a tool call needs constrained decoding, which the worker lacks"
        )
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                raise bad_field(f"tools[{i}]", "must be {'type': 'function', 'function': {...}}")
    if choice == "none" or not tools:
        tools = None
    return tools, extra


def template_options(tools: list[Any] | None, extra: dict[str, Any]) -> ChatTemplateOptions:
    thinking = extra.pop("enable_thinking", None)
    if thinking is not None and not isinstance(thinking, bool):
        raise bad_field("chat_template_kwargs.enable_thinking", "must be true or false")
    return ChatTemplateOptions(tools=tools, enable_thinking=thinking, extra=extra)


async def fim_job(
    worker: WorkerHandle, prompt: str, suffix: str, params: GenerationParameters
) -> Job:
    """Fill-in-the-middle: the model's FIM tokens around prefix and suffix, as token ids."""
    fmt = await worker.fim_format()
    if fmt is None:
        raise unsupported("suffix", f"model {worker.model_id} has no fill-in-the-middle tokens")
    tokens = list(fmt.bos)
    for part in fmt.layout:
        if part == "{prefix}":
            tokens += await worker.client.tokenize(prompt, add_special_tokens=False)
        elif part == "{suffix}":
            tokens += await worker.client.tokenize(suffix, add_special_tokens=False)
        else:
            tokens.append(fmt.marker_ids[part])
    return Job(parameters=params, tokens=tokens)


def completion_prompts(body: Body) -> list[str | list[int]]:
    """`prompt`: a string, an array of strings, token ids, or arrays of token ids."""
    prompt = body.raw("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad_field(
        "prompt",
        "must be a string, an array of strings, or (arrays of) token ids",
        "missing_required_parameter" if prompt is None else "invalid_value",
    )


def default_max_tokens(worker: WorkerHandle) -> int:
    """No max_tokens: up to the context's end (the worker stops there with `length`)."""
    if worker.info is None:
        raise ApiError(503, "the worker's limits are unknown", type="server_error")
    return min(worker.info.limits.max_tokens, worker.info.context_length)
