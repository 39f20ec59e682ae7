"""Wire forms derived from dataclass annotations: the one place types become checks.

`types.py` and the codec (`protocol.py`) both read and write maps through
these helpers, so a field's default, its wire type and its coercion are
written once, in its dataclass declaration. Errors are `ValueError`s naming
the problem; callers add where it happened.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# Field metadata keys.
ALWAYS = "always"  # written even when it equals its default (SPEC 2.4 rule 3)
MIN = "min"  # the least value of an int field on the wire (counts default to 0)
POSITIVE = "positive"  # a float field that must be > 0

_NONE = type(None)


def is_int(value: Any) -> bool:
    """A wire int: any int but a bool (SPEC 2.2)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """What a float field accepts: an int or a float, never a bool (SPEC 2.3 rule 5)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class FieldSpec:
    """One dataclass field as the wire sees it: name, resolved type, default."""

    __slots__ = ("default", "field", "inner", "kind", "name", "optional", "required")

    def __init__(self, f: Field[Any], kind: Any) -> None:
        self.field = f
        self.name = f.name
        self.kind = kind
        self.inner, self.optional = unwrap_optional(kind)
        self.required = f.default is MISSING and f.default_factory is MISSING
        self.default: Any = None
        if f.default is not MISSING:
            self.default = f.default
        elif f.default_factory is not MISSING:
            self.default = f.default_factory()

    def fresh_default(self) -> Any:
        """The default, a new object each time for mutable defaults."""
        factory = self.field.default_factory
        return factory() if factory is not MISSING else self.default


_SPECS: dict[type, tuple[FieldSpec, ...]] = {}


def specs(cls: type) -> tuple[FieldSpec, ...]:
    """The fields of a dataclass with their annotations resolved, in declaration order."""
    found = _SPECS.get(cls)
    if found is None:
        hints = get_type_hints(cls)
        found = _SPECS[cls] = tuple(FieldSpec(f, hints[f.name]) for f in fields(cls))
    return found


def unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """`X | None` → (X, True); anything else → (kind, False)."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not _NONE]
        if len(args) < len(get_args(kind)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return kind, False


# -- writing -----------------------------------------------------------------------------------


def to_wire_map(obj: Any, *, omit_defaults: bool = True) -> dict[str, Any]:
    """The canonical map of a dataclass: fields in order, defaults left out unless ALWAYS."""
    out: dict[str, Any] = {}
    for spec in specs(type(obj)):
        value = getattr(obj, spec.name)
        if (
            omit_defaults
            and not spec.required
            and not spec.field.metadata.get(ALWAYS)
            and value == spec.default
        ):
            continue
        out[spec.name] = wire_value(spec.inner, value)
    return out


def wire_value(kind: Any, value: Any) -> Any:
    """One value in its canonical wire form (SPEC 2.4): floats as floats, sorted logit_bias."""
    if value is None:
        return None
    if kind is float:
        return float(value)
    if kind is int:
        return int(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return to_wire_map(value, omit_defaults=False)
    origin = get_origin(kind)
    if origin is dict and get_args(kind)[0] is int:  # logit_bias: sorted, keys as strings
        (_, vkind) = get_args(kind)
        return {str(k): wire_value(vkind, value[k]) for k in sorted(value)}
    if origin is list:
        (item,) = get_args(kind)
        return [wire_value(item, v) if not isinstance(v, Mapping) else dict(v) for v in value]
    return value


# -- reading -----------------------------------------------------------------------------------


def read_map(cls: type, data: Any) -> dict[str, Any]:
    """Constructor arguments for `cls` from a wire map: nil is absence, unknown keys ignored."""
    if not isinstance(data, Mapping):
        raise ValueError(f"must be a map, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for spec in specs(cls):
        raw = data.get(spec.name)
        if raw is None:
            if spec.required:
                raise ValueError(f"{spec.name} is required")
            continue
        try:
            out[spec.name] = coerce(spec.inner, raw)
        except ValueError as exc:
            raise ValueError(f"{spec.name} {exc}") from None
    return out


def coerce(kind: Any, value: Any) -> Any:
    """Check a wire value against a field type and convert it; raises ValueError("must ...")."""
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be a bool, got {_name(value)}")
        return value
    if kind is int:
        if not is_int(value):
            raise ValueError(f"must be an int, got {_name(value)}")
        return int(value)
    if kind is float:
        if not is_number(value):
            raise ValueError(f"must be a number, got {_name(value)}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a str, got {_name(value)}")
        return value
    return _coerce_generic(kind, value)


def _coerce_generic(kind: Any, value: Any) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        return value
    if origin in (Union, types.UnionType):
        for alternative in args:
            try:
                return coerce(alternative, value)
            except ValueError:
                continue
        raise ValueError(f"must be {' or '.join(_kind_name(a) for a in args)}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"must be an array, got {_name(value)}")
        try:
            return [coerce(args[0], item) for item in value]
        except ValueError as exc:
            raise ValueError(f"must be an array of {_kind_name(args[0])}: an item {exc}") from None
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a map, got {_name(value)}")
        keys, values = args
        read_key = token_key if keys is int else _str_key
        return {read_key(k): _coerce_item(values, k, v) for k, v in value.items()}
    raise TypeError(f"no wire form for {kind!r}")  # pragma: no cover - a declaration bug


def _coerce_item(kind: Any, key: Any, value: Any) -> Any:
    try:
        return coerce(kind, value)
    except ValueError as exc:
        raise ValueError(f"value for {key!r} {exc}") from None


def _str_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"has a non-str key ({_name(key)})")
    return key


def token_key(key: Any) -> int:
    """A logit_bias key: a canonical decimal string (SPEC 6.1) or, leniently, an int."""
    if is_int(key):
        return int(key)
    if (
        isinstance(key, str)
        and 0 < len(key) <= 10
        and key.isascii()
        and key.isdigit()
        and (key == "0" or key[0] != "0")
    ):
        return int(key)
    raise ValueError(f"has a bad token id key {key!r:.40}")


def _name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


def _kind_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
