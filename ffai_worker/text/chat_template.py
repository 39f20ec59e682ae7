"""Chat templates rendered exactly as transformers' `apply_chat_template(tokenize=False)` does.

Templates come from model repositories, so they are untrusted code: they run in
jinja2's immutable sandbox with the extras vendors rely on (`raise_exception`,
`strftime_now`, an HF-flavoured `tojson`, a restricted `dict` and `namespace`,
the `{% generation %}` tag). The message, tool and document handling, the
`continue_final_message` trimming and the error messages follow
transformers.utils.chat_template_utils (transformers 5.x), which is the oracle
the tests compare against byte for byte.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ffai_client.types import ChatMessage
from ffai_worker.text.template_budget import (
    BudgetedSandbox,
    RenderBudget,
    budgeted_filter,
    metered,
    weight,
)

NO_CHAT_TEMPLATE = "no_chat_template"
TEMPLATE_ERROR = "template_error"

# Appended to the continued message so its end can be found in the rendered text.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Names a message's reasoning goes by; templates mostly read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_NO_TEMPLATE_MESSAGE = (
    "Cannot use chat template functions because tokenizer.chat_template is not set and no template "
    "argument was passed! For information about writing templates and setting the "
    "tokenizer.chat_template attribute, please see the documentation at "
    "https://huggingface.co/docs/transformers/main/en/chat_templating"
)


class ChatTemplateError(Exception):
    """A conversation could not be rendered; `code` is no_chat_template or template_error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- template selection ------------------------------------------------------------------
def select_template(
    chat_templates: Mapping[str, str], tools: list[Any] | None, name: str | None = None
) -> str:
    """The template source to render, chosen as transformers' `get_chat_template` does.

    `chat_templates` maps names to sources ({"default": ...} for a single
    template). `name` picks one by name; a `name` that is not a known name is
    itself the template source (transformers' `chat_template=` argument).
    Without a name, tools (even an empty list) prefer "tool_use", else "default".
    """
    if name is not None:
        return chat_templates.get(name, name)
    if tools is not None and "tool_use" in chat_templates:
        return chat_templates["tool_use"]
    if "default" in chat_templates:
        return chat_templates["default"]
    if not chat_templates:
        raise ChatTemplateError(NO_CHAT_TEMPLATE, _NO_TEMPLATE_MESSAGE)
    raise ChatTemplateError(
        NO_CHAT_TEMPLATE,
        "This model has multiple chat templates with no default specified! Please either pass a "
        "chat template or the name of the template you wish to use to the `chat_template` "
        f"argument. Available template names are {sorted(chat_templates.keys())}.",
    )


# -- the sandboxed environment ------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; rendering keeps its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 reads this class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        block = jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body)
        block.set_lineno(lineno)
        return block

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's own filter: no HTML escaping, and json.dumps' options exposed.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    # Looks `datetime` up at call time so tests can freeze the clock.
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore names that could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja2's Namespace, so `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute."
            )


class _StrictSandbox(BudgetedSandbox):
    """The immutable, budgeted sandbox, failing on the first touch of an unsafe attribute.

    jinja2 (and so transformers) returns an undefined that only raises when used,
    so `{{ x.__class__ }}` renders as "". A template that probes internals is
    hostile: refuse it outright, with the message jinja2 would raise later.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe."
        )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = budgeted_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    """Compiled once per template source: the worker renders on every request."""
    return _environment().from_string(source)


def precompile(source: str) -> None:
    """Compile a template ahead of its first render; a broken one fails at render time."""
    try:
        _compile(source)
    except Exception:
        pass


# -- inputs -------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Rebuild a value from plain JSON-like types, so the sandbox never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        return _plain(value.item())  # numpy scalars; np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _message_dicts(messages: Sequence[Mapping[str, Any] | ChatMessage]) -> list[dict[str, Any]]:
    """Messages as transformers sees them: dicts, keys whose value is None dropped."""
    out = []
    for message in messages:
        if isinstance(message, ChatMessage):
            message = message.to_dict()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                TEMPLATE_ERROR,
                "Chat messages should be dicts, dataclasses or pydantic models, "
                f"but got {message!r}.",
            )
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Expose a message's reasoning as both `thinking` and `reasoning_content`."""
    aliased = []
    for message in chat:
        reasoning = next(
            (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
        )
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _tool_schemas(tools: Sequence[Any] | None) -> list[Any] | None:
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(get_json_schema(tool))
        else:
            raise ValueError(
                "Tools should either be a JSON schema, or a callable function with type hints "
                "and a docstring suitable for auto-conversion to a schema."
            )
    return schemas


def _check_documents(documents: Sequence[Any] | None) -> None:
    for document in documents or ():
        if not isinstance(document, dict):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")


# -- rendering ----------------------------------------------------------------------------
def render(
    template: str,
    messages: Sequence[Mapping[str, Any] | ChatMessage],
    budget: RenderBudget | None = None,
    /,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool | str = False,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """Render one conversation: transformers' apply_chat_template(tokenize=False), byte for byte.

    `bos_token` / `eos_token` stand in for the tokenizer's special tokens (left
    undefined when None, like a tokenizer without them). `extra` reaches the
    template as variables (enable_thinking, date_string, reasoning_effort, ...).
    `continue_final_message` may name the field to continue (default "content").
    `budget` bounds the template's time and the size of what it builds
    (template_budget.py; default RenderBudget()); positional so that no template
    keyword can collide with it.
    Raises ChatTemplateError(template_error) for anything the template or the
    inputs get wrong, with transformers' (or the template's own) message.
    """
    chat = _message_dicts(messages)
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    context = {**{k: v for k, v in specials.items() if v is not None}, **extra}
    try:
        return _render(
            template,
            chat,
            add_generation_prompt,
            continue_final_message,
            tools,
            documents,
            context,
            budget or RenderBudget(),
        )
    except ChatTemplateError:
        raise
    except Exception as exc:
        # Sandbox violations, syntax and undefined errors, raise_exception and errors of
        # Python operations inside the template all end here, with their own message.
        raise ChatTemplateError(TEMPLATE_ERROR, str(exc)) from exc


def _render(
    template: str,
    chat: list[dict[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool | str,
    tools: Sequence[Any] | None,
    documents: Sequence[Any] | None,
    context: dict[str, Any],
    budget: RenderBudget,
) -> str:
    if not chat:
        raise ValueError(
            "Cannot apply chat template to an empty conversation. Provide at least one message."
        )
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible. Use "
            "continue_final_message when you want the model to continue the final message, and "
            "add_generation_prompt when you want to add a header that will prompt it to start a "
            "new assistant message instead."
        )
    compiled = _compile(template)
    tool_schemas = _plain(_tool_schemas(tools))
    _check_documents(documents)
    plain_documents = _plain(documents)
    context = _plain(context)
    chat = _alias_reasoning(_plain(chat))
    final = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = _tag_final_message(template, chat, field)
    with metered(budget, weight((chat, tool_schemas, plain_documents, context))):
        rendered: str = compiled.render(
            messages=chat,
            tools=tool_schemas,
            documents=plain_documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    if final is not None:
        rendered = _trim_after_final(rendered, final)
    return rendered


def _tag_final_message(template: str, chat: list[dict[str, Any]], field: str) -> str:
    """Mark the end of the final message's `field`; return its original text."""
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(
            f'continue_final_message is set but the final message has no "{field}" to continue!'
        )
    fields = [field]
    if field in _REASONING_FIELDS:
        # Reasoning is copied under several names: tag every copy, accept whichever is read.
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ValueError(
            f'continue_final_message is set to "{field}" but this is not an accepted field in '
            "the chat_template"
        )
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                # The last text block is the one to continue.
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return str(final)
        raise ValueError(
            "continue_final_message is set but we could not find any text to continue in the "
            "final message!"
        )
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return str(final)


def _trim_after_final(rendered: str, final: str) -> str:
    """Cut the rendered text right after the continued message's text."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the chat after "
            "applying the chat template! This can happen if the chat template deletes portions of "
            "the final message. Please verify the chat template and final message in your chat to "
            "ensure they are compatible."
            f"Final message to continue: {final.strip()}\nRendered chat:\n{rendered}"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]  # the template kept the spacing after the message
    return rendered[:at].rstrip()  # it trimmed trailing space: drop what is left of it


# -- functions as tools (transformers' get_json_schema) -----------------------------------
_DESCRIPTION_RE = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS_RE = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_ARGS_SPLIT_RE = re.compile(
    r"(?:^|\n)([ \t]*)(\w+):\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+:|\Z)", re.DOTALL
)
_RETURNS_RE = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
_JSON_SCALARS: dict[type, str] = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    type(None): "null",
}
_JSON_TYPES: dict[Any, dict[str, str]] = {
    **{t: {"type": name} for t, name in _JSON_SCALARS.items()},
    list: {"type": "array"},
    tuple: {"type": "array"},
    dict: {"type": "object"},
    Any: {},
}


class ToolSchemaError(ValueError):
    """A function passed as a tool has type hints or a docstring that cannot become a schema."""


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    kinds = list(dict.fromkeys(_JSON_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint_schema(hint: Any) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        values = [member.value for member in hint]
        if not values:
            raise ToolSchemaError(
                f"The Enum {hint.__name__} has no members, so no value could ever match it."
            )
        if any(type(v) not in _JSON_SCALARS for v in values):
            raise ToolSchemaError(
                f"The Enum {hint.__name__} has member values that cannot be written as JSON "
                f"scalars.\nValues: {values}\nEnum member values must be int, float, str, bool or "
                "None to be converted to a JSON schema."
            )
        return _enum_schema(values)
    if origin is None:
        if hint not in _JSON_TYPES:
            raise ToolSchemaError(
                f"Couldn't convert the type hint {hint!r} to a JSON schema, likely because it is a "
                "custom class or object. Supported type hints are basic types like int, float, str "
                "and bool, Enum classes, typing.Literal, and list, tuple, dict and Union types "
                "containing those. If you need a more complex schema than that, you can write the "
                "JSON schema for your tool by hand and pass that instead of the function."
            )
        return dict(_JSON_TYPES[hint])
    if origin is Union or origin is types.UnionType:
        subs = [_hint_schema(t) for t in args if t is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        if any(type(a) not in _JSON_SCALARS for a in args):
            raise ToolSchemaError("Only the valid python literals can be listed in typing.Literal.")
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1:
            raise ToolSchemaError(
                f"The type hint {str(hint).replace('typing.', '')} is a Tuple with a single "
                "element, which we do not automatically convert to JSON schema as it is rarely "
                "necessary. If this input can contain more than one element, we recommend using a "
                "list[] type instead, or if it really is a single element, remove the tuple[] "
                "wrapper and just pass the element directly."
            )
        if ... in args:
            raise ToolSchemaError(
                "Conversion of '...' is not supported in Tuple type hints. Use list[] types for "
                "variable-length inputs instead."
            )
        return {"type": "array", "prefixItems": [_hint_schema(t) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _hint_schema(args[1])
        return out
    raise ToolSchemaError(
        "Couldn't parse this type hint, likely due to a custom class or object: ", hint
    )


def _parameters_schema(func: Callable[..., Any]) -> dict[str, Any]:
    hints = get_type_hints(func)
    params = inspect.signature(func).parameters
    first = next(iter(params), None)
    receiver = (
        first
        if first in {"self", "cls"} and params[first].annotation is inspect.Parameter.empty
        else None
    )
    required = []
    for name, param in params.items():
        if name == receiver:
            continue
        if param.annotation is inspect.Parameter.empty:
            raise ToolSchemaError(
                f"Argument {name} is missing a type hint in function {func.__name__}"
            )
        if param.default is inspect.Parameter.empty:
            required.append(name)
    properties: dict[str, Any] = {}
    for name, hint in hints.items():
        if name == receiver:
            continue
        try:
            properties[name] = _hint_schema(hint)
        except ToolSchemaError:
            if name != "return":  # the model never writes the return value
                raise
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def get_json_schema(func: Callable[..., Any]) -> dict[str, Any]:
    """A tool schema from a function's type hints and Google-style docstring (as transformers)."""
    name = getattr(func, "__name__", "operation")
    doc = (inspect.getdoc(func) or "").strip()
    if not doc:
        raise ToolSchemaError(
            f"Cannot generate JSON schema for {name} because it has no docstring!"
        )
    description = _DESCRIPTION_RE.search(doc)
    args_block = _ARGS_RE.search(doc)
    returns = _RETURNS_RE.search(doc)
    arg_docs: dict[str, str] = {}
    if args_block:
        lines = "\n".join(line for line in args_block.group(1).split("\n") if line.strip())
        arg_docs = {
            m[1]: re.sub(r"\s*\n+\s*", " ", m[2].strip()) for m in _ARGS_SPLIT_RE.findall(lines)
        }
    schema = _parameters_schema(func)
    return_schema = schema["properties"].pop("return", None)
    if return_schema is not None and returns:
        return_schema["description"] = returns.group(1).strip()
    for arg, arg_schema in schema["properties"].items():
        if arg not in arg_docs:
            raise ToolSchemaError(
                f"Cannot generate JSON schema for {name} because the docstring has no description "
                f"for the argument '{arg}'"
            )
        text = arg_docs[arg]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", text, flags=re.IGNORECASE)
        if choices:
            values = json.loads(choices.group(1))
            arg_schema["enum"] = [c.strip() if isinstance(c, str) else c for c in values]
            text = text[: choices.start()].strip()
        arg_schema["description"] = text
    function: dict[str, Any] = {
        "name": name,
        "description": description.group(1).strip() if description else None,
        "parameters": schema,
    }
    if return_schema is not None:
        function["return"] = return_schema
    return {"type": "function", "function": function}
