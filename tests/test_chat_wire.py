"""Chat over the wire: `render()` and `generate_stream(messages=...)` against real workers.

Two models: tinystories (its own simple template) and a random-weight Llama carrying
the real Llama 3 tokenizer and template. Oracles: transformers' apply_chat_template
(text and ids), the in-process engine (greedy tokens) and `tokenizers` (text).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import (
    ChatMessage,
    ChatTemplateOptions,
    Client,
    GenerationParameters,
    TemplateError,
)

GREEDY = GenerationParameters(temperature=0.0, max_tokens=24, stop_on_eos=False)
DATE = "03 Mar 2025"  # not the Llama 3 template's default (26 Jul 2024), so it must arrive

SYSTEM_USER = [
    ChatMessage("system", "You are a storyteller. Keep it short."),
    ChatMessage("user", "Tell me about Lily and her red ball."),
]
MULTI_TURN = [
    ChatMessage("user", "Hi!"),
    ChatMessage("assistant", "Hello! Do you want a story?"),
    ChatMessage("user", "Yes, about a dog named Max. ☀️ café"),
]
CONVERSATIONS = {"system_user": SYSTEM_USER, "multi_turn": MULTI_TURN}


class Served:
    """One model: its folder, a worker serving it, the options its template wants."""

    def __init__(self, folder: Path, worker: WorkerProcess, extra: dict[str, Any]) -> None:
        self.folder = folder
        self.endpoint = worker.endpoint
        self.extra = extra

    @property
    def options(self) -> ChatTemplateOptions | None:
        return ChatTemplateOptions(extra=self.extra) if self.extra else None


@pytest.fixture(scope="module")
def llama3_worker(slow_model: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(slow_model, "--max-batch", "4")
    yield worker
    worker.stop()


@pytest.fixture(params=["tinystories", "llama3"])
def served(request: pytest.FixtureRequest) -> Served:
    if request.param == "tinystories":
        return Served(TINYSTORIES, request.getfixturevalue("tinystories_worker"), {})
    folder = request.getfixturevalue("slow_model")
    return Served(folder, request.getfixturevalue("llama3_worker"), {"date_string": DATE})


@cache
def hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@cache
def engine_for(folder: Path) -> Any:
    import ffai_worker  # noqa: F401  (preloads BLAS before mlx)
    from ffai_worker.engine import Engine

    return Engine.load(folder)


def oracle(folder: Path, messages: list[ChatMessage], **kwargs: Any) -> tuple[str, list[int]]:
    """transformers' rendering of `messages`: the text, and the ids of tokenize=True."""
    tok = hf_tokenizer(folder)
    chat = [m.to_dict() for m in messages]
    text: str = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
    encoded = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, **kwargs)
    # transformers 5 returns a BatchEncoding; 4.x returned the list of ids itself.
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return text, [int(t) for t in ids]


def decoded_addition(folder: Path, prompt: list[int], generated: list[int]) -> str:
    """What the generated tokens add to the text: decode(prompt + generated) - decode(prompt)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    before = raw.decode(prompt, skip_special_tokens=True)
    after = raw.decode(prompt + generated, skip_special_tokens=True)
    assert after.startswith(before)
    return after[len(before) :]


# -- render -------------------------------------------------------------------------------
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_render_equals_apply_chat_template(served: Served, conversation: str) -> None:
    messages = CONVERSATIONS[conversation]
    text, ids = oracle(served.folder, messages, **served.extra)
    with Client(served.endpoint) as client:
        reply = client.render(messages, served.options)
    assert reply.text == text
    assert reply.tokens == ids
    for message in messages:
        assert str(message.content).strip() in reply.text
    if served.extra:
        assert f"Today Date: {DATE}\n" in reply.text


def test_render_options_reach_the_template(slow_model: Path, llama3_worker: WorkerProcess) -> None:
    """Without the extra the template falls back to its own date: a different rendering."""
    with Client(llama3_worker.endpoint) as client:
        plain = client.render(SYSTEM_USER)
        dated = client.render(SYSTEM_USER, ChatTemplateOptions(extra={"date_string": DATE}))
        no_prompt = client.render(
            SYSTEM_USER,
            ChatTemplateOptions(add_generation_prompt=False, extra={"date_string": DATE}),
        )
    assert plain.text == oracle(slow_model, SYSTEM_USER)[0]
    assert plain.text != dated.text
    expected = hf_tokenizer(slow_model).apply_chat_template(
        [m.to_dict() for m in SYSTEM_USER], tokenize=False, date_string=DATE
    )
    assert no_prompt.text == expected
    assert dated.text == expected + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# -- generate_stream(messages=...) ----------------------------------------------------------
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_generate_from_messages_equals_engine(served: Served, conversation: str) -> None:
    messages = CONVERSATIONS[conversation]
    _, ids = oracle(served.folder, messages, **served.extra)
    with Client(served.endpoint) as client:
        chunks = list(
            client.generate_stream(messages=messages, parameters=GREEDY, options=served.options)
        )
    final = chunks[-1]
    assert final.is_final and final.finish_reason == "length"
    assert final.stats is not None and final.stats.prompt_tokens == len(ids)
    assert all(not c.is_final for c in chunks[:-1])
    generated = [t for c in chunks for t in c.tokens]
    text = "".join(c.text for c in chunks)

    local = engine_for(served.folder).generate(tokens=ids, parameters=GREEDY)
    assert generated == local.generated_tokens
    assert len(generated) == GREEDY.max_tokens
    assert text == local.text
    assert text == decoded_addition(served.folder, ids, generated)


@pytest.mark.parametrize("seed", [7, 2024])
def test_seeded_sampling_from_messages_equals_engine(
    slow_model: Path, llama3_worker: WorkerProcess, seed: int
) -> None:
    """Greedy decoding of a random model repeats one token; seeded sampling walks the whole
    128k vocabulary (multi-byte pieces, special ids), and must still match token for token."""
    params = GenerationParameters(temperature=1.0, seed=seed, max_tokens=64, stop_on_eos=False)
    options = ChatTemplateOptions(extra={"date_string": DATE})
    _, ids = oracle(slow_model, MULTI_TURN, date_string=DATE)
    with Client(llama3_worker.endpoint) as client:
        chunks = list(
            client.generate_stream(messages=MULTI_TURN, parameters=params, options=options)
        )
    generated = [t for c in chunks for t in c.tokens]
    text = "".join(c.text for c in chunks)
    assert len(set(generated)) > 10  # the sample is varied, unlike greedy
    local = engine_for(slow_model).generate(tokens=ids, parameters=params)
    assert generated == local.generated_tokens
    assert text == local.text == decoded_addition(slow_model, ids, generated)


def test_generate_from_messages_equals_generate_from_prompt_tokens(
    tinystories_worker: WorkerProcess,
) -> None:
    """The same conversation sent as messages or as its rendered ids streams the same tokens."""
    with Client(tinystories_worker.endpoint) as client:
        rendered = client.render(MULTI_TURN)
        by_messages = client.generate(messages=MULTI_TURN, parameters=GREEDY)
        by_tokens = client.generate(tokens=rendered.tokens, parameters=GREEDY)
    assert by_messages.generated_tokens == by_tokens.generated_tokens
    assert by_messages.text == by_tokens.text
    assert by_messages.prompt_tokens == len(rendered.tokens)


# -- errors over the wire -----------------------------------------------------------------
def model_copy(destination: Path, template: str | None) -> Path:
    """A writable copy of tinystories whose only chat template is `template` (None: none)."""
    destination.mkdir()
    for f in TINYSTORIES.iterdir():
        shutil.copyfile(f, destination / f.name)  # copyfile: the copy is writable
    (destination / "chat_template.jinja").unlink()
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config, indent=2))
    if template is not None:
        (destination / "chat_template.jinja").write_text(template)
    return destination


RAISING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('No system prompts here, got: ' + message['content']) }}"
    "{% endif %}{{ 'User: ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def assert_still_serving(client: Client) -> None:
    """The worker that just refused a request answers a valid one, start to end."""
    expected = engine_for(TINYSTORIES).generate("Once upon a time", parameters=GREEDY)
    served = client.generate("Once upon a time", parameters=GREEDY)
    assert served.generated_tokens == expected.generated_tokens
    assert served.text == expected.text
    info = client.info()
    assert info.running == 0 and info.waiting == 0


def test_no_chat_template(tmp_path: Path) -> None:
    folder = model_copy(tmp_path / "no-template", None)
    theirs = hf_tokenizer(folder)
    with pytest.raises(ValueError, match="chat_template is not set") as hf_error:
        theirs.apply_chat_template([m.to_dict() for m in MULTI_TURN], tokenize=False)

    worker = WorkerProcess(folder)
    try:
        with Client(worker.endpoint) as client:
            assert client.info().has_chat_template is False
            with pytest.raises(TemplateError) as rendered:
                client.render(MULTI_TURN)
            assert rendered.value.code == "no_chat_template"
            assert rendered.value.message == str(hf_error.value)
            assert_still_serving(client)

            with pytest.raises(TemplateError) as streamed:
                list(client.generate_stream(messages=MULTI_TURN, parameters=GREEDY))
            assert streamed.value.code == "no_chat_template"
            assert_still_serving(client)
            # Plain prompts never needed a template.
            assert client.tokenize("Once") == engine_for(TINYSTORIES).tokenize("Once")
    finally:
        worker.stop()


def test_template_raise_exception(tmp_path: Path) -> None:
    folder = model_copy(tmp_path / "raising", RAISING_TEMPLATE)
    theirs = hf_tokenizer(folder)
    with pytest.raises(jinja2.exceptions.TemplateError) as hf_error:
        theirs.apply_chat_template([m.to_dict() for m in SYSTEM_USER], tokenize=False)
    message = f"No system prompts here, got: {SYSTEM_USER[0].content}"
    assert str(hf_error.value) == message

    worker = WorkerProcess(folder)
    try:
        with Client(worker.endpoint) as client:
            assert client.info().has_chat_template is True
            with pytest.raises(TemplateError) as rendered:
                client.render(SYSTEM_USER)
            assert rendered.value.code == "template_error"
            assert rendered.value.message == message
            assert_still_serving(client)

            with pytest.raises(TemplateError) as streamed:
                list(client.generate_stream(messages=SYSTEM_USER, parameters=GREEDY))
            assert (streamed.value.code, streamed.value.message) == ("template_error", message)
            assert_still_serving(client)

            # The same template renders a conversation it accepts, as transformers does.
            user_only = SYSTEM_USER[1:]
            text, ids = oracle(folder, user_only)
            reply = client.render(user_only)
            assert (reply.text, reply.tokens) == (text, ids)
            result = client.generate(messages=user_only, parameters=GREEDY)
            expected = engine_for(TINYSTORIES).generate(tokens=ids, parameters=GREEDY)
            assert result.generated_tokens == expected.generated_tokens
    finally:
        worker.stop()


def test_llama3_template_raises_on_parallel_tool_calls(
    slow_model: Path, llama3_worker: WorkerProcess
) -> None:
    """The vendor's own raise_exception (one tool call per message) comes back as template_error."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [
        ChatMessage("user", "Weather in Oslo and Bergen?"),
        ChatMessage("assistant", "", tool_calls=[call, call]),
    ]
    with pytest.raises(jinja2.exceptions.TemplateError) as hf_error:
        hf_tokenizer(slow_model).apply_chat_template(
            [m.to_dict() for m in messages], tokenize=False, date_string=DATE
        )
    options = ChatTemplateOptions(extra={"date_string": DATE})
    with Client(llama3_worker.endpoint) as client:
        with pytest.raises(TemplateError) as rendered:
            client.render(messages, options)
        assert rendered.value.code == "template_error"
        assert rendered.value.message == str(hf_error.value)
        assert "single tool-calls" in rendered.value.message
        with pytest.raises(TemplateError) as streamed:
            list(client.generate_stream(messages=messages, parameters=GREEDY, options=options))
        assert streamed.value.code == "template_error"
        # One tool call is fine, and the worker still serves.
        single = [messages[0], ChatMessage("assistant", "", tool_calls=[call])]
        text, ids = oracle(slow_model, single, date_string=DATE)
        reply = client.render(single, options)
        assert (reply.text, reply.tokens) == (text, ids)
        result = client.generate(messages=single, parameters=GREEDY, options=options)
        assert result.finish_reason == "length"
        assert result.generated_tokens == (
            engine_for(slow_model).generate(tokens=ids, parameters=GREEDY).generated_tokens
        )
