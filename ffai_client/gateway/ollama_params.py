"""Ollama request bodies → worker jobs: `options`, messages, tools.

Options we cannot honour are refused by name (`mirostat`, `tfs_z`,
`typical_p` other than their neutral values, unknown keys); options that
only tune Ollama's own runtime (`num_gpu`, `num_thread`, ...) are accepted
and have no effect here. `num_ctx` larger than the model's context is an
error; a smaller one is accepted (the worker's context is the upper bound).
"""

from __future__ import annotations

import json
from typing import Any

from ffai_client.gateway.errors import bad_field, unsupported
from ffai_client.gateway.fields import Body, build_parameters
from ffai_client.gateway.workers import WorkerHandle
from ffai_client.types import ChatMessage, GenerationParameters

_RUNTIME_ONLY = frozenset(
    "num_keep num_batch num_gpu main_gpu low_vram f16_kv vocab_only use_mmap use_mlock numa "
    "num_thread penalize_newline mirostat_tau mirostat_eta".split()
)
_NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
_SAMPLING = frozenset(
    "temperature top_k top_p min_p num_predict stop seed repeat_penalty repeat_last_n "
    "presence_penalty frequency_penalty num_ctx".split()
)
_NAMES = {
    "max_tokens": "options.num_predict",
    "repetition_penalty": "options.repeat_penalty",
    "repetition_context_size": "options.repeat_last_n",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty",
    "seed": "options.seed",
    "stop": "options.stop",
}


def check_unsupported(body: Body) -> None:
    if body.raw("format") not in (None, ""):
        raise unsupported("format", "the worker has no constrained decoding yet (JSON, schemas)")
    for name in ("images", "context", "template"):
        if body.raw(name) not in (None, [], ""):
            why = {
                "images": "the worker generates from text only",
                "context": "token context from an earlier reply is not kept; send the text",
                "template": "a Go template cannot drive the model's Jinja chat template",
            }[name]
            raise unsupported(name, why)


def parameters(body: Body, worker: WorkerHandle) -> GenerationParameters:
    """The generation parameters from `options` (and `keep_alive`, accepted)."""
    opts = Body(body.obj("options") or {}, "options.")
    for key, value in opts.data.items():
        if key in _NEUTRAL and value is not None and value != _NEUTRAL[key]:
            raise unsupported(f"options.{key}", f"only {_NEUTRAL[key]} (off) is supported")
        if key not in _SAMPLING and key not in _RUNTIME_ONLY and key not in _NEUTRAL:
            raise bad_field(
                f"options.{key}", "is not an option this gateway knows", "unknown_option"
            )
    assert worker.info is not None
    context = worker.info.context_length
    num_ctx = opts.integer("num_ctx")
    if num_ctx is not None and num_ctx > context:
        raise bad_field(
            "options.num_ctx",
            f"{num_ctx} exceeds the model's context length ({context} tokens)",
            "context_length_exceeded",
        )
    predict = opts.integer("num_predict", -1)
    assert predict is not None
    if predict in (-1, -2):
        predict = min(worker.info.limits.max_tokens, context)  # Ollama's "until the end"
    elif predict < 1:
        raise bad_field("options.num_predict", f"must be positive, -1 or -2, got {predict}")
    last_n = opts.integer("repeat_last_n")
    penalty = opts.number("repeat_penalty", 1.0)
    if last_n == 0:
        penalty = 1.0  # Ollama: 0 turns the penalty off
    seed = opts.integer("seed")
    return build_parameters(
        _NAMES,
        max_tokens=predict,
        temperature=opts.number("temperature"),
        top_p=opts.number("top_p", 1.0),
        top_k=opts.integer("top_k", 0),
        min_p=opts.number("min_p", 0.0),
        repetition_penalty=penalty,
        repetition_context_size=None if last_n in (None, 0, -1) else last_n,
        presence_penalty=opts.number("presence_penalty", 0.0),
        frequency_penalty=opts.number("frequency_penalty", 0.0),
        seed=None if seed is None or seed < 0 else seed,  # Ollama: -1 is random
        stop=opts.stop(),
    )


def messages(body: Body) -> list[ChatMessage]:
    raw = body.array("messages") or []
    return [_message(m, f"messages[{i}]") for i, m in enumerate(raw)]


def _message(m: Any, where: str) -> ChatMessage:
    if not isinstance(m, dict):
        raise bad_field(where, "must be an object")
    role = m.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        raise bad_field(f"{where}.role", f"must be system, user, assistant or tool, got {role!r}")
    if m.get("images"):
        raise unsupported(f"{where}.images", "the worker generates from text only")
    content = m.get("content", "")
    if not isinstance(content, str):
        raise bad_field(f"{where}.content", "must be a string")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise bad_field(f"{where}.tool_calls", "must be an array")
        calls = [_template_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    thinking = m.get("thinking")
    name = m.get("tool_name")
    return ChatMessage(
        role=role,
        content=content,
        tool_calls=calls or None,
        thinking=thinking if isinstance(thinking, str) else None,
        name=name if isinstance(name, str) else None,
    )


def _template_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_field(where, "needs function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise bad_field(f"{where}.function.arguments", "must be a JSON object") from None
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def tools(body: Body) -> list[Any] | None:
    raw = body.array("tools")
    for i, tool in enumerate(raw or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise bad_field(f"tools[{i}]", "must be {'type': 'function', 'function': {...}}")
    return raw or None
