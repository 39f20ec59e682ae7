"""Tool calls parsed out of a model's streamed text, per model family.

A parser is fed the text of each chunk as it arrives and returns events:
`TextDelta` (text to show) and `ToolCall` (a complete call, arguments as JSON
text). Text that might begin a tool call is held back until it is clearly
one or clearly not, so nothing is shown twice and a call never leaks out as
text. Whitespace next to tool calls is dropped (models put newlines between
calls); elsewhere it is only delayed to the next text.

Families:
- `hermes` (Qwen2.5, Qwen3 and many fine-tunes):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the
  newer `[TOOL_CALLS]name[ARGS]{...}`.
- `llama3`: a reply that is a JSON object `{"name": ..., "parameters": {...}}`
  (several separated by `;`), optionally after `<|python_tag|>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI's `function.arguments`


ParsedEvent = Union[TextDelta, ToolCall]  # noqa: UP007 - a runtime alias
# What reading a call body gives: the events, and the text left after it; None: need more.
_Read = tuple[list[ParsedEvent], str] | None


def _as_call(
    value: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")
) -> ToolCall | None:
    """A ToolCall from a decoded `{"name": ..., "arguments": ...}`, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args: Any = {}
    for key in args_keys:
        if key in value:
            args = value[key]
            break
    if isinstance(args, str):
        return ToolCall(value["name"], args)
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """The shared machinery: find the opening marker, read call bodies, hold whitespace."""

    OPEN = ""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._ws = ""  # trailing whitespace not shown yet
        self._started = False  # any non-whitespace text shown
        self.calls = 0

    def feed(self, text: str) -> list[ParsedEvent]:
        self._buf += text
        out: list[ParsedEvent] = []
        self._scan(out, final=False)
        return out

    def finish(self) -> list[ParsedEvent]:
        """Flush at the end of the stream: an unfinished call comes out as text."""
        out: list[ParsedEvent] = []
        self._scan(out, final=True)
        if self._in_call:
            self._text(out, self._marker_text() + self._buf)
        elif self._buf:
            self._text(out, self._buf)
        self._buf = ""
        self._in_call = False
        if self._ws and not self.calls:
            out.append(TextDelta(self._ws))
        self._ws = ""
        return out

    def _scan(self, out: list[ParsedEvent], final: bool) -> None:
        while True:
            if self._in_call:
                got = self._read_call(self._buf, final)
                if got is None:
                    return
                events, self._buf = got
                self._in_call = False
                for event in events:
                    self._emit(out, event)
                continue
            found = self._find_open(self._buf)
            if found is None:
                hold = 0 if final else self._hold(self._buf)
                self._text(out, self._buf[: len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold :]
                return
            start, end = found
            self._text(out, self._buf[:start])
            self._buf = self._buf[end:]
            self._in_call = True

    # -- family hooks ------------------------------------------------------------------------
    def _find_open(self, buf: str) -> tuple[int, int] | None:
        """(start, end) of the opening marker in `buf`, or None."""
        i = buf.find(self.OPEN)
        return None if i < 0 else (i, i + len(self.OPEN))

    def _hold(self, buf: str) -> int:
        return _held_prefix(buf, self.OPEN)

    def _marker_text(self) -> str:
        return self.OPEN

    def _read_call(self, buf: str, final: bool) -> _Read:
        raise NotImplementedError

    # -- output ------------------------------------------------------------------------------
    def _emit(self, out: list[ParsedEvent], event: ParsedEvent) -> None:
        if isinstance(event, ToolCall):
            self._ws = ""  # whitespace around calls is layout, not content
            self.calls += 1
            out.append(event)
        else:
            self._text(out, event.text)

    def _text(self, out: list[ParsedEvent], text: str) -> None:
        if not text:
            return
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body) :]
        if not body:
            return
        self._started = True
        if out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + body)
        else:
            out.append(TextDelta(body))

    def _unparsed(self, body: str, rest: str) -> tuple[list[ParsedEvent], str]:
        """A complete call body that is not a call: show it as it came."""
        return [TextDelta(self._marker_text() + body)], rest


class HermesParser(ToolCallParser):
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def _read_call(self, buf: str, final: bool) -> _Read:
        end = buf.find(self.CLOSE)
        if end < 0:
            return None
        body, rest = buf[:end], buf[end + len(self.CLOSE) :]
        try:
            call = _as_call(json.loads(body))
        except ValueError:
            call = None
        if call is None:
            return self._unparsed(body + self.CLOSE, rest)
        return [call], rest


class MistralParser(ToolCallParser):
    OPEN = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def _read_call(self, buf: str, final: bool) -> _Read:
        s = buf.lstrip()
        if not s:
            return None
        if s[0] == "[":
            return self._read_array(buf, s)
        brace = s.find("{")
        if brace < 0 or not s.rstrip().endswith("}"):
            return None
        name = s[:brace].replace(self.ARGS, "").strip()
        try:
            args, end = _DECODER.raw_decode(s, brace)
        except ValueError:
            return None
        call = _as_call({"name": name, "arguments": args}) if name else None
        if call is None:
            return self._unparsed(s[:end], s[end:])
        return [call], s[end:]

    def _read_array(self, buf: str, s: str) -> _Read:
        if not s.rstrip().endswith("]"):
            return None
        try:
            value, end = _DECODER.raw_decode(s)
        except ValueError:
            return None
        calls = [_as_call(v) for v in value] if isinstance(value, list) else [None]
        if not calls or any(c is None for c in calls):
            return self._unparsed(s[:end], s[end:])
        return [c for c in calls if c is not None], s[end:]


class Llama3Parser(ToolCallParser):
    OPEN = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._opened_by_tag = False

    def _find_open(self, buf: str) -> tuple[int, int] | None:
        i = buf.find(self.OPEN)
        if i >= 0:
            self._opened_by_tag = True
            return i, i + len(self.OPEN)
        # A reply that opens with `{` may be a call; so may what follows a call after `;`.
        if self.calls:
            stripped = buf.lstrip().removeprefix(";").lstrip()
            if stripped.startswith("{"):
                self._opened_by_tag = False
                return 0, len(buf) - len(stripped)  # the separator goes with the call
        elif not self._started:
            stripped = buf.lstrip()
            if stripped.startswith("{"):
                self._opened_by_tag = False
                start = len(buf) - len(stripped)
                return start, start
        return None

    def _hold(self, buf: str) -> int:
        if (not self._started or self.calls) and buf.strip() in ("", ";"):
            return len(buf)  # only whitespace (or a separator) so far: a call may still start
        return _held_prefix(buf, self.OPEN)

    def _marker_text(self) -> str:
        return self.OPEN if self._opened_by_tag else ""

    def _read_call(self, buf: str, final: bool) -> _Read:
        s = buf.lstrip()
        if not s.rstrip().endswith("}"):
            return None
        try:
            value, end = _DECODER.raw_decode(s)
        except ValueError:
            return None
        call = _as_call(value, ("parameters", "arguments"))
        if call is None:
            self._started = True  # JSON, but not a call: from here on it is all text
            return self._unparsed(s[:end], s[end:])
        return [call], s[end:]


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "mistral": MistralParser,
    "llama3": Llama3Parser,
}
