"""Chat templates: every vendor template renders byte for byte as transformers' apply_chat_template.

The oracle is transformers itself, run at test time on the same template source,
messages and options; where it raises, we must raise ChatTemplateError
(template_error) with the same message.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import pytest
import transformers.utils.chat_template_utils as hf_chat
from chat_cases import CASES, USER, WEATHER_TOOL, special_tokens
from transformers import PreTrainedTokenizerFast

import ffai_worker  # noqa: F401 - first, before anything imports mlx
from ffai_client.types import ChatMessage
from ffai_worker.text import chat_template
from ffai_worker.text.chat_template import (
    ChatTemplateError,
    get_json_schema,
    render,
    select_template,
)
from ffai_worker.text.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "models" / "tinystories-260k"


def _collect_templates() -> dict[str, str]:
    found = {
        f"chat_templates/{p.stem}": p.read_text(encoding="utf-8")
        for p in sorted((SHARED / "chat_templates").glob("*.jinja"))
    }
    configs = sorted((SHARED / "tokenizers").glob("*/tokenizer_config.json"))
    for config in [*configs, TINYSTORIES / "tokenizer_config.json"]:
        source = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if source is not None:
            found[f"tokenizer_config/{config.parent.name}"] = source
    found["tinystories/chat_template.jinja"] = (TINYSTORIES / "chat_template.jinja").read_text(
        encoding="utf-8"
    )
    return found


TEMPLATES = _collect_templates()


class _FrozenDatetime(dt.datetime):
    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> _FrozenDatetime:
        return cls(2025, 3, 7, 14, 30, 5, tzinfo=tz)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both strftime_now implementations look `datetime` up at call time."""
    monkeypatch.setattr(hf_chat, "datetime", _FrozenDatetime)
    monkeypatch.setattr(chat_template, "datetime", _FrozenDatetime)


@pytest.fixture(scope="module")
def hf() -> PreTrainedTokenizerFast:
    """A real tokenizer with no special tokens, so the template sees only what we pass."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TINYSTORIES / "tokenizer.json"))
    assert tok.special_tokens_map == {}
    return tok


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    named = {"add_generation_prompt", "continue_final_message", "tools", "documents"}
    return (
        {k: v for k, v in options.items() if k in named},
        {k: v for k, v in options.items() if k not in named},
    )


def oracle(
    tok: PreTrainedTokenizerFast,
    source: str,
    messages: list[Any],
    options: dict[str, Any],
    specials: tuple[str | None, str | None],
) -> tuple[str | None, str | None]:
    """(text, None) or (None, error message) from transformers."""
    names = ("bos_token", "eos_token")
    tokens = {k: v for k, v in zip(names, specials, strict=True) if v is not None}
    try:
        text = tok.apply_chat_template(
            copy.deepcopy(messages),
            chat_template=source,
            tokenize=False,
            **tokens,
            **copy.deepcopy(options),
        )
    except Exception as exc:
        return None, str(exc)
    assert isinstance(text, str)
    return text, None


def ours(
    source: str,
    messages: list[Any],
    options: dict[str, Any],
    specials: tuple[str | None, str | None],
) -> tuple[str | None, str | None]:
    named, extra = _split_options(copy.deepcopy(options))
    named.setdefault("add_generation_prompt", False)  # transformers' default
    try:
        text = render(
            source, messages, bos_token=specials[0], eos_token=specials[1], **named, **extra
        )
    except ChatTemplateError as exc:
        assert exc.code == "template_error"
        assert str(exc) == exc.message
        return None, exc.message
    return text, None


# -- the parity matrix: every template x every conversation ----------------------------------
@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("template_id", list(TEMPLATES))
def test_matches_transformers(hf: PreTrainedTokenizerFast, template_id: str, case: str) -> None:
    source, spec = TEMPLATES[template_id], CASES[case]
    specials = special_tokens(template_id)
    expected = oracle(hf, source, spec["messages"], spec["options"], specials)
    before = copy.deepcopy(spec)
    assert ours(source, spec["messages"], spec["options"], specials) == expected
    assert spec == before  # the caller's messages are never edited


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("template_id", list(TEMPLATES))
def test_templates_render_real_conversations(hf: PreTrainedTokenizerFast, template_id: str) -> None:
    """Guard against a matrix of identical errors: the common conversations must render."""
    rendered = 0
    for case in ("user", "multi_turn", "no_generation_prompt", "continue_final", "tools"):
        spec = CASES[case]
        specials = special_tokens(template_id)
        text, error = ours(TEMPLATES[template_id], spec["messages"], spec["options"], specials)
        if error is None:
            first_user = next(m["content"] for m in spec["messages"] if m["role"] == "user")
            assert text is not None and first_user in text
            rendered += 1
    assert rendered >= 3, template_id


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize(
    "case", ["multi_turn", "reasoning_history", "tool_call_roundtrip", "list_parts"]
)
@pytest.mark.parametrize("template_id", [t for t in TEMPLATES if t.startswith("chat_templates/")])
def test_chat_message_input_renders_like_dicts(
    hf: PreTrainedTokenizerFast, template_id: str, case: str
) -> None:
    spec = CASES[case]
    as_messages = [ChatMessage.from_dict(m) for m in spec["messages"]]
    specials = special_tokens(template_id)
    source = TEMPLATES[template_id]
    got = ours(source, as_messages, spec["options"], specials)
    assert got == ours(source, spec["messages"], spec["options"], specials)
    assert got == oracle(hf, source, spec["messages"], spec["options"], specials)


def test_frozen_clock_reaches_strftime_now(hf: PreTrainedTokenizerFast, frozen_clock: None) -> None:
    source = TEMPLATES["chat_templates/llama-3.2-instruct"]
    text, _ = ours(source, [USER], {"add_generation_prompt": True}, (None, None))
    assert text is not None and "Today Date: 07 Mar 2025" in text


def test_strftime_now_reads_the_real_clock() -> None:
    before = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = render("{{ strftime_now('%Y-%m-%d %H:%M') }}", [USER])
    assert text in {before, dt.datetime.now().strftime("%Y-%m-%d %H:%M")}


# -- loaded tokenizers: our Tokenizer's templates and tokens against AutoTokenizer ------------
@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("folder", [SHARED / "tokenizers/llama3", SHARED / "tokenizers/qwen2.5"])
def test_loaded_tokenizer_matches(folder: Path) -> None:
    theirs = PreTrainedTokenizerFast.from_pretrained(folder)
    mine = Tokenizer.from_folder(folder)
    for case in ("multi_turn", "tool_call_roundtrip", "continue_final"):
        spec = CASES[case]
        named, extra = _split_options(spec["options"])
        expected = theirs.apply_chat_template(spec["messages"], tokenize=False, **spec["options"])
        template = select_template(mine.chat_templates, named.get("tools"))
        got = render(
            template,
            spec["messages"],
            bos_token=mine.bos_token,
            eos_token=mine.eos_token,
            **named,
            **extra,
        )
        assert got == expected, case


# -- template selection --------------------------------------------------------------------
def test_no_template_is_no_chat_template(hf: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError) as theirs:
        hf.apply_chat_template([USER], tokenize=False)
    with pytest.raises(ChatTemplateError) as mine:
        select_template({}, None)
    assert mine.value.code == "no_chat_template"
    assert str(mine.value) == str(theirs.value)
    deepseek = Tokenizer.from_folder(SHARED / "tokenizers/deepseek-v4")
    with pytest.raises(ChatTemplateError, match="chat_template is not set"):
        select_template(deepseek.chat_templates, [WEATHER_TOOL])


NAMED = {"default": "D{{ messages[0].content }}", "tool_use": "T{{ tools | length }}"}


@pytest.mark.parametrize(
    ("templates", "name", "tools"),
    [
        (NAMED, None, None),
        (NAMED, None, [WEATHER_TOOL]),
        (NAMED, None, []),  # transformers: any list, even empty, asks for tool_use
        (NAMED, "tool_use", None),
        (NAMED, "default", [WEATHER_TOOL]),
        (NAMED, "literal {{ 1 + 1 }}", None),  # an unknown name is the template itself
        ({"default": NAMED["default"]}, None, [WEATHER_TOOL]),
        ({"tool_use": NAMED["tool_use"], "rag": "R"}, None, [WEATHER_TOOL]),
        ({"tool_use": NAMED["tool_use"], "rag": "R"}, None, None),
    ],
)
def test_select_template_matches_transformers(
    hf: PreTrainedTokenizerFast,
    templates: dict[str, str],
    name: str | None,
    tools: list[Any] | None,
) -> None:
    tok = copy.copy(hf)
    tok.chat_template = dict(templates)
    try:
        expected: str | None = tok.get_chat_template(name, tools)
        message = None
    except ValueError as exc:
        expected, message = None, str(exc)
    try:
        got: str | None = select_template(templates, tools, name)
    except ChatTemplateError as exc:
        assert exc.code == "no_chat_template"
        got = None
        assert exc.message == message
    assert got == expected


# -- tool functions become JSON schemas as in transformers ---------------------------------
class Unit(Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(
    location: str,
    unit: Unit = Unit.CELSIUS,
    days: int | None = None,
    hourly: bool = False,
    fields: list[str] | None = None,
    box: tuple[float, float] | None = None,
    extra: dict[str, int] | None = None,
    mode: Literal["fast", "exact"] = "fast",
) -> dict[str, float]:
    """
    Get the weather forecast for a location.

    Args:
        location: The city and country,
            for example "Paris, France"
        unit: The temperature unit
        days: How many days ahead (choices: [1, 3, 7])
        hourly: Whether to return hourly values
        fields: Which fields to return
        box: A bounding box
        extra: Extra numeric options
        mode: Speed or precision

    Returns:
        The forecast, keyed by field name.
    """
    return {}


def no_docstring(x: int) -> int:
    return x


def undocumented_arg(x: int, y: int) -> int:
    """
    Adds.

    Args:
        x: The first number
    """
    return x + y


@pytest.mark.parametrize("func", [get_weather, no_docstring, undocumented_arg])
def test_get_json_schema_matches_transformers(func: Any) -> None:
    try:
        expected: Any = hf_chat.get_json_schema(func)
    except Exception as exc:
        expected = str(exc)
    try:
        got: Any = get_json_schema(func)
    except ValueError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.parametrize(
    "template_id", ["chat_templates/qwen3", "chat_templates/llama-3.1-instruct"]
)
def test_function_tools_render_like_transformers(
    hf: PreTrainedTokenizerFast, template_id: str
) -> None:
    options = {"add_generation_prompt": True, "tools": [get_weather, WEATHER_TOOL]}
    specials = special_tokens(template_id)
    expected = oracle(hf, TEMPLATES[template_id], [USER], options, specials)
    assert expected[0] is not None and "get_weather" in expected[0]
    named, _ = _split_options(options)
    got = render(
        TEMPLATES[template_id], [USER], bos_token=specials[0], eos_token=specials[1], **named
    )
    assert got == expected[0]


# -- the sandbox and errors ----------------------------------------------------------------
MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ open('/etc/passwd').read() }}",
    "{{ messages.__class__.__base__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace(_x=1) %}{{ ns._x }}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ dict.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ (1).__class__.__base__.__subclasses__() }}",
    "{{ messages[0].content.format.__self__.__class__ }}",
]


@pytest.mark.parametrize("source", MALICIOUS)
def test_sandbox_refuses(hf: PreTrainedTokenizerFast, source: str) -> None:
    with pytest.raises(ChatTemplateError) as mine:
        render(source, [USER])
    assert mine.value.code == "template_error"
    text, message = oracle(hf, source, [USER], {"add_generation_prompt": True}, (None, None))
    # Same message where transformers raises; where it prints the unsafe attribute's
    # undefined as "" we refuse earlier (an intended, stricter difference).
    assert message == mine.value.message or (text == "" and "unsafe" in mine.value.message)


@pytest.mark.parametrize(
    "source",
    [
        "{{ raise_exception('Only user and assistant roles, got ' ~ messages[0].role) }}",
        "{% for m in messages %}{{ m.content }",  # syntax error
        "{{ messages[0].content + 1 }}",  # TypeError inside rendering
        "{{ undefined_thing.attr }}",  # UndefinedError
        "{{ messages[5].content | upper }}",
        "{{ {'a': 1} | tojson(indent=2, sort_keys=True, separators=(',', ' = ')) }}ok",
        "{% generation %}{{ messages[0].content }}{% endgeneration %}",
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% break %}"
        "{% endfor %}",
        "{{ dict(a=1, b='é') | tojson }}{{ dict.fromkeys(['x'], 0) | tojson }}",
        "{% set ns = namespace(a=[], self=1) %}{{ ns.self }}{{ ns.a | tojson }}",
        "{{ {'x': '<&>', 'é': 'ü'} | tojson }}",  # no HTML escaping, no ASCII escaping
        # trim_blocks / lstrip_blocks: the newline after a tag and the indent before it go
        "{% for m in messages %}\n    {% if m.role %}\n  [{{ m.role }}]\n"
        "    {% endif %}\n{% endfor %}\n",
    ],
)
def test_extras_and_errors_match(hf: PreTrainedTokenizerFast, source: str) -> None:
    expected = oracle(hf, source, [USER], {"add_generation_prompt": True}, (None, None))
    assert ours(source, [USER], {"add_generation_prompt": True}, (None, None)) == expected


def test_raise_exception_message_is_exact() -> None:
    with pytest.raises(ChatTemplateError) as exc:
        render("{{ raise_exception('Roles must alternate!') }}", [USER])
    assert exc.value.code == "template_error"
    assert exc.value.message == "Roles must alternate!" == str(exc.value)


def test_bad_inputs_are_template_errors(hf: PreTrainedTokenizerFast) -> None:
    source = "{{ documents | tojson }}"
    expected = oracle(hf, source, [USER], {"documents": ["not a dict"]}, (None, None))
    assert ours(source, [USER], {"documents": ["not a dict"]}, (None, None)) == expected
    expected = oracle(hf, source, [USER], {"tools": ["not a tool"]}, (None, None))
    assert ours(source, [USER], {"tools": ["not a tool"]}, (None, None)) == expected
    with pytest.raises(ChatTemplateError, match="Chat messages should be dicts"):
        render(source, ["just a string"])  # type: ignore[list-item]


def test_none_tokens_stay_undefined() -> None:
    source = "{{ bos_token is defined }}/{{ eos_token }}"
    assert render(source, [USER], eos_token="</s>") == "False/</s>"
    assert render(source, [USER], bos_token="<s>", eos_token=None) == "True/"


def test_extra_variables_reach_the_template() -> None:
    source = "{{ template }}|{{ reasoning_effort }}|{{ enable_thinking }}"
    text = render(source, [USER], template="t", reasoning_effort="high", enable_thinking=False)
    assert text == "t|high|False"


def test_compiled_templates_are_cached() -> None:
    source = "{{ messages | length }} cached {{ add_generation_prompt }}"
    render(source, [USER])
    hits = chat_template._compile.cache_info().hits
    assert render(source, [USER, USER], add_generation_prompt=False) == "2 cached False"
    assert chat_template._compile.cache_info().hits == hits + 1
