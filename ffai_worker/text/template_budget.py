"""A work budget for rendering untrusted chat templates: time, size and call depth.

A model repository's chat template is code. jinja2's sandbox keeps it away from
Python internals but not from unbounded work: nested `range` loops run for
hours, `9**(9**9)` is one C call that never returns, `'a' * 10**9` or string
doubling take gigabytes. `BudgetedSandbox` meters a render instead:

- every loop iteration, call, written piece and sized operation checks the
  render's deadline (`RenderBudget.time_s`);
- operations that could build a huge value are checked BEFORE they run (`*`,
  `**`, `+`, `%`, `~`, str methods such as `ljust`/`replace`/`join`/`format`,
  filters with a count or width argument): no value may outgrow the size limit
  (`max_chars` plus `input_factor` times the size of the inputs), and ints
  stay under `MAX_INT_BITS`;
- everything written, also into `{% set %}` blocks, counts against that limit;
- macro and call nesting stops at `MAX_CALL_DEPTH`; `lipsum` writes at most
  `MAX_LIPSUM` paragraphs of `MAX_LIPSUM` words.

Loops, `~` and output are instrumented by rewriting the parsed template (the
`_parse` hook); calls and operators go through the sandbox's own hooks. Checks
cost well under a microsecond each; real templates render unchanged, byte for
byte. Exceeding the budget raises `BudgetExceeded` (a jinja2 SecurityError),
which the renderer reports as `template_error`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.nodes as nodes
import jinja2.runtime
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_INT_BITS = 1 << 16  # ~20k decimal digits; str() refuses ints over 4300 digits anyway
MAX_CALL_DEPTH = 100  # nested macro/function calls; real templates nest a handful
MAX_LIPSUM = 100  # paragraphs and words per paragraph of `lipsum()`
MAX_JSON_INDENT = 16  # tojson(indent=...) beyond this is not formatting, it is padding


@dataclass(frozen=True)
class RenderBudget:
    """What one render may spend: seconds of wall time, and characters/items of any value."""

    time_s: float = 1.0
    max_chars: int = 1 << 20
    input_factor: int = 8  # the size limit grows with the conversation: a copy or two of it


class BudgetExceeded(jinja2.exceptions.SecurityError):
    """The template tried to do more work than its render budget allows."""


class _Meter:
    __slots__ = ("deadline", "depth", "limit", "time_s", "written")

    def __init__(self, budget: RenderBudget, input_size: int) -> None:
        self.time_s = budget.time_s
        self.deadline = time.monotonic() + budget.time_s
        self.limit = budget.max_chars + budget.input_factor * input_size
        self.written = 0
        self.depth = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"the chat template ran past its {self.time_s:g} s budget")

    def size(self, n: int, what: str) -> None:
        if n > self.limit:
            raise BudgetExceeded(
                f"the chat template would build {what} of size {n}, over its budget of {self.limit}"
            )

    def write(self, n: int) -> None:
        self.written += n
        if self.written > self.limit:
            raise BudgetExceeded(
                f"the chat template wrote more than its budget of {self.limit} characters"
            )
        self.tick()


_local = threading.local()  # the meter of the render running on this thread


def _meter() -> _Meter | None:
    meter: _Meter | None = getattr(_local, "meter", None)
    return meter


@contextmanager
def metered(budget: RenderBudget, input_size: int) -> Iterator[None]:
    """Meter every template operation on this thread against `budget` until exit."""
    previous = _meter()
    _local.meter = _Meter(budget, input_size)
    try:
        yield
    finally:
        _local.meter = previous


def weight(value: Any, limit: int | None = None) -> int:
    """Characters of strs plus items of containers, nested; stops counting past `limit`.

    Roughly the size of `str(value)` (each item adds a few characters of punctuation).
    """
    if isinstance(value, str):
        return len(value)  # the common case, without the walk
    total, stack, seen = 0, [value], set()
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, dict)):
            total += len(v)
            if limit is None or total <= limit:
                stack.extend(v.items() if isinstance(v, dict) else v)
        elif isinstance(v, jinja2.utils.Namespace) and id(v) not in seen:
            seen.add(id(v))  # namespaces may refer to themselves
            stack.append(dict(v._Namespace__attrs))  # type: ignore[attr-defined]
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        else:
            total += 1
        if limit is not None and total > limit:
            return total
    return total


def _int_too_big(n: Any, meter: _Meter) -> bool:
    return isinstance(n, int) and abs(n) > meter.limit


_DIGITS = re.compile(r"\d+")


def _check_format(meter: _Meter, fmt: str, args: Any) -> None:
    """A %- or {}-format can pad to any width written in it or passed as an argument."""
    for run in _DIGITS.findall(fmt):
        if len(run) > 12 or int(run) > meter.limit:
            raise BudgetExceeded(f"the chat template used a format width of {run}")
    meter.size(len(fmt) + weight(args, meter.limit), "a formatted string")
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else ()
    if any(_int_too_big(a, meter) for a in values):
        raise BudgetExceeded("the chat template passed a huge number to a format")


# -- operators -----------------------------------------------------------------------------
def _check_binop(meter: _Meter, op: str, left: Any, right: Any) -> None:
    meter.tick()
    if op == "+" and type(left) is str and type(right) is str:
        meter.size(len(left) + len(right), "a sum")  # the common case first
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            meter_bits = left.bit_length() * right
            if meter_bits > MAX_INT_BITS:
                raise BudgetExceeded(f"the chat template computed a {meter_bits}-bit number")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise BudgetExceeded(f"the chat template computed a {bits}-bit number")
        elif isinstance(right, int) and isinstance(left, (str, list, tuple)):
            meter.size(weight(left, meter.limit) * max(right, 0), "a repeated sequence")
        elif isinstance(left, int) and isinstance(right, (str, list, tuple)):
            meter.size(weight(right, meter.limit) * max(left, 0), "a repeated sequence")
    elif op == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            meter.size(weight(left, meter.limit) + weight(right, meter.limit), "a sum")
    elif op == "%" and isinstance(left, str):
        _check_format(meter, left, right)


# -- calls ----------------------------------------------------------------------------------
_PADDING = {"ljust", "rjust", "center", "zfill"}


def _check_call(meter: _Meter, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse str method calls whose result would outgrow the size limit, before they run."""
    wrapped = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format / format_map
    owner = getattr(wrapped, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(wrapped, "__name__", "")
    if name in _PADDING and args and _int_too_big(args[0], meter):
        meter.size(args[0], f"a string padded by {name}")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            meter.size(len(owner) + owner.count("\t") * tab, "an expanded string")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        meter.size(len(owner) + owner.count(old) * max(0, len(new) - len(old)), "a replaced string")
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            meter.size(weight(items, meter.limit) + len(owner) * len(items), "a joined string")
    elif name in ("format", "format_map"):
        _check_format(meter, owner, (*args, *kwargs.values()))


def _check_result(meter: _Meter, value: Any) -> None:
    if isinstance(value, (str, list, tuple, dict)):
        meter.size(len(value), "a value")


# -- filters --------------------------------------------------------------------------------
def _check_filter(meter: _Meter, name: str, value: Any, args: tuple[Any, ...], kwargs: Any) -> None:
    meter.tick()
    extra = (*args, *kwargs.values())
    if any(_int_too_big(a, meter) for a in extra):
        raise BudgetExceeded(f"the chat template passed a huge number to the {name} filter")
    if name in ("string", "pprint", "tojson", "join", "list", "indent", "wordwrap", "center"):
        meter.size(weight(value, meter.limit), f"the input of the {name} filter")
    if name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        meter.size(len(value) + (value.count("\n") + 1) * per_line, "an indented string")
    elif name == "replace" and len(args) >= 2 and isinstance(value, str):
        old, new = str(args[0]), str(args[1])
        meter.size(len(value) + value.count(old) * max(0, len(new) - len(old)), "a string")
    elif name == "join" and isinstance(value, (list, tuple)):
        sep = args[0] if args else kwargs.get("d", "")
        meter.size(weight(value, meter.limit) + len(str(sep)) * len(value), "a joined string")
    elif name == "format" and isinstance(value, str):
        _check_format(meter, value, extra)
    elif name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        size = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        if size > MAX_JSON_INDENT:
            raise BudgetExceeded(f"the chat template asked for a JSON indent of {size}")


def budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` behind the budget checks; never folded at compile time (it needs the context)."""
    pass_arg = jinja2.utils._PassArg.from_obj(func)

    @jinja2.pass_context
    def run(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        if meter is not None:
            _check_filter(meter, name, value, args, kwargs)
        if pass_arg is jinja2.utils._PassArg.context:
            rv = func(context, value, *args, **kwargs)
        elif pass_arg is jinja2.utils._PassArg.eval_context:
            rv = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is jinja2.utils._PassArg.environment:
            rv = func(context.environment, value, *args, **kwargs)
        else:
            rv = func(value, *args, **kwargs)
        if meter is not None:
            _check_result(meter, rv)
        return rv

    return run


# -- instrumentation of the parsed template ---------------------------------------------------
@jinja2.pass_context
def _loop(context: jinja2.runtime.Context, iterable: Any) -> Iterator[Any]:
    meter = _meter()
    for item in iterable:
        if meter is not None:
            meter.tick()
        yield item


@jinja2.pass_context
def _concat(context: jinja2.runtime.Context, parts: tuple[Any, ...]) -> str:
    meter = _meter()
    if meter is not None:
        meter.tick()
        meter.size(sum(weight(p, meter.limit) for p in parts), "a concatenated string")
    return jinja2.runtime.str_join(parts)


@jinja2.pass_context
def _written(context: jinja2.runtime.Context, value: Any) -> Any:
    meter = _meter()
    if meter is not None:
        meter.write(len(value) if isinstance(value, str) else weight(value, meter.limit))
    return value


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """jinja2's lorem ipsum, at most MAX_LIPSUM paragraphs of at most MAX_LIPSUM words."""
    if not all(isinstance(a, int) and a <= MAX_LIPSUM for a in (n, min, max)):
        raise BudgetExceeded(f"the chat template asked for lorem ipsum over {MAX_LIPSUM}")
    text: str = jinja2.utils.generate_lorem_ipsum(n, html, min, max)
    return text


_LOOP, _CONCAT, _WRITTEN = "__budget_loop", "__budget_concat", "__budget_written"


def _filter(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Instrument(NodeTransformer):
    """Route loop iterables, `~` and every written piece through the meter."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _filter(node.iter, _LOOP)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _filter(nodes.Tuple(node.nodes, "load", lineno=node.lineno), _CONCAT)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            _filter(
                nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData) else n,
                _WRITTEN,
            )
            for n in node.nodes
        ]
        return node


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, metering every render against the thread's `metered` budget."""

    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["lipsum"] = _lipsum
        for name, func in list(self.filters.items()):
            self.filters[name] = budgeted_filter(name, func)
        self.filters[_LOOP] = _loop
        self.filters[_CONCAT] = _concat
        self.filters[_WRITTEN] = _written

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        instrumented: nodes.Template = _Instrument().visit(tree)
        return instrumented

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        meter = _meter()
        if meter is not None:
            _check_binop(meter, operator, left, right)
        rv = self.binop_table[operator](left, right)
        if meter is not None:
            _check_result(meter, rv)
        return rv

    def call(
        __self,  # jinja2's signature: double underscores avoid kwarg clashes
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        meter = _meter()
        if meter is None:
            return super().call(__context, __obj, *args, **kwargs)
        meter.tick()
        _check_call(meter, __obj, args, kwargs)
        if meter.depth >= MAX_CALL_DEPTH:
            raise BudgetExceeded(f"the chat template nested calls deeper than {MAX_CALL_DEPTH}")
        meter.depth += 1
        try:
            rv = super().call(__context, __obj, *args, **kwargs)
        finally:
            meter.depth -= 1
        _check_result(meter, rv)
        return rv
