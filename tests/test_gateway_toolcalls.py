"""Tool-call parsers: each family's format, in arbitrary chunkings, gives the same events."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ffai_client.gateway.toolcalls import (
    HermesParser,
    Llama3Parser,
    MistralParser,
    ParsedEvent,
    TextDelta,
    ToolCall,
    ToolCallParser,
)

WEATHER = ToolCall("get_weather", json.dumps({"city": "Paris", "unit": "°C"}, ensure_ascii=False))
TIME = ToolCall("get_time", json.dumps({"tz": "UTC"}))

# (parser class, model output, expected events after merging text)
CASES: list[tuple[type[ToolCallParser], str, list[ParsedEvent]]] = [
    (
        HermesParser,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "°C"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>',
        [TextDelta("Let me check."), WEATHER, TIME],
    ),
    (
        HermesParser,
        "No tools needed: 1 < 2 and <b>bold</b>.",
        [TextDelta("No tools needed: 1 < 2 and <b>bold</b>.")],
    ),
    (
        HermesParser,
        "<tool_call>not json</tool_call> after",
        [TextDelta("<tool_call>not json</tool_call> after")],
    ),
    (
        HermesParser,
        'cut short <tool_call>{"name": "x"',
        [TextDelta('cut short <tool_call>{"name": "x"')],
    ),
    (
        MistralParser,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}, '
        '{"name": "get_time", "arguments": {"tz": "UTC"}}]',
        [WEATHER, TIME],
    ),
    (
        MistralParser,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "°C"}',
        [WEATHER],
    ),
    (MistralParser, "Plain [text] with [brackets].", [TextDelta("Plain [text] with [brackets].")]),
    (
        Llama3Parser,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "°C"}}; '
        '{"name": "get_time", "parameters": {"tz": "UTC"}}',
        [WEATHER, TIME],
    ),
    (
        Llama3Parser,
        '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}',
        [TIME],
    ),
    (Llama3Parser, '  {"answer": 42} is JSON', [TextDelta('  {"answer": 42} is JSON')]),
    (Llama3Parser, "The set {1, 2} is small.", [TextDelta("The set {1, 2} is small.")]),
]


def _merged(events: list[ParsedEvent]) -> list[ParsedEvent]:
    out: list[ParsedEvent] = []
    for event in events:
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + event.text)
        elif not (isinstance(event, TextDelta) and not event.text):
            out.append(event)
    return out


def _run(parser: ToolCallParser, pieces: list[str]) -> list[ParsedEvent]:
    events: list[ParsedEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    return _merged(events + parser.finish())


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def test_each_case_in_one_piece_and_char_by_char() -> None:
    for cls, text, expected in CASES:
        assert _run(cls(), [text]) == expected, text
        assert _run(cls(), list(text)) == expected, text


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(CASES) - 1), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_chunking_gives_the_same_events(case: int, cuts: list[int]) -> None:
    cls, text, expected = CASES[case]
    assert _run(cls(), _split(text, cuts)) == expected


def test_text_that_may_open_a_call_is_held_then_released() -> None:
    parser = HermesParser()
    assert parser.feed("Hello <tool") == [TextDelta("Hello")]  # "<tool" might open a call
    assert parser.feed("box>") == [TextDelta(" <toolbox>")]  # it did not: shown once, in order
    assert parser.finish() == []


def test_no_call_text_is_never_lost_or_doubled() -> None:
    text = "a <tool_call b\n\n [TOOL_CALLS x {y} <|python_tag "
    for cls in (HermesParser, MistralParser, Llama3Parser):
        out = _run(cls(), list(text))
        assert "".join(e.text for e in out if isinstance(e, TextDelta)) == text, cls


def test_calls_are_counted() -> None:
    parser = HermesParser()
    _run(parser, [CASES[0][1]])
    assert parser.calls == 2
