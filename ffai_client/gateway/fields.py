"""Reading a JSON request body field by field, with a 400 that names the field.

`Body` wraps the decoded object; each accessor returns the value or the
default when the field is absent or null, and raises `ApiError` (400, param
set to the field's name) when it has the wrong type or range.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ffai_client.errors import FFAIError
from ffai_client.gateway.errors import ApiError, bad_field
from ffai_client.types import GenerationParameters


class Body:
    """A request's JSON object; `prefix` names nested fields (`options.top_k`)."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    def name(self, field: str) -> str:
        return self.prefix + field

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def raw(self, field: str) -> Any:
        return self.data.get(field)

    def number(self, field: str, default: float | None = None) -> float | None:
        value = self.data.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_field(self.name(field), f"must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise bad_field(self.name(field), "must be finite")
        return float(value)

    def integer(self, field: str, default: int | None = None) -> int | None:
        value = self.data.get(field)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON writers that emit 5.0 for 5
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_field(self.name(field), f"must be an integer, got {_kind(value)}")
        return value

    def flag(self, field: str, default: bool = False) -> bool:
        value = self.data.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_field(self.name(field), f"must be true or false, got {_kind(value)}")
        return value

    def text(self, field: str, default: str | None = None) -> str | None:
        value = self.data.get(field)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad_field(self.name(field), f"must be a string, got {_kind(value)}")
        return value

    def obj(self, field: str) -> dict[str, Any] | None:
        value = self.data.get(field)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise bad_field(self.name(field), f"must be an object, got {_kind(value)}")
        return value

    def array(self, field: str) -> list[Any] | None:
        value = self.data.get(field)
        if value is None:
            return None
        if not isinstance(value, list):
            raise bad_field(self.name(field), f"must be an array, got {_kind(value)}")
        return value

    def stop(self, field: str = "stop") -> list[str]:
        """`stop`: a string or an array of non-empty strings."""
        value = self.data.get(field)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise bad_field(self.name(field), "must be a string or an array of strings")
        if any(s == "" for s in items):
            raise bad_field(self.name(field), "stop strings must not be empty")
        return list(items)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else 400."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


_PROBLEM_FIELD = re.compile(r"(?:invalid generation parameters: )?(\w+)")


def build_parameters(names: dict[str, str], **values: Any) -> GenerationParameters:
    """`GenerationParameters(**values)`, its ValueError turned into a 400 naming the field.

    `names` maps our parameter names to the API's (`repetition_penalty` is
    Ollama's `options.repeat_penalty`), so the error names what the caller sent.
    """
    try:
        return GenerationParameters(**values)
    except (ValueError, FFAIError) as exc:
        text = str(exc)
        match = _PROBLEM_FIELD.match(text.removeprefix("invalid generation parameters: "))
        ours = match.group(1) if match else ""
        param = names.get(ours, ours) or None
        message = text.removeprefix("invalid generation parameters: ")
        for theirs_ours, theirs in names.items():
            message = message.replace(theirs_ours, theirs)
        raise ApiError(400, message, param=param, code="invalid_value") from None
