"""The gateway, end to end: a real worker, a real `ffai-gateway`, the official clients.

Greedy requests through the OpenAI and Ollama APIs must give the text,
token counts and finish reasons `AsyncClient` gets for the same request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from conftest import TINYSTORIES, WorkerProcess
from gateway_process import GatewayProcess

from ffai_client import AsyncClient, ChatMessage, GenerationParameters, GenerationResult

MODEL = "tinystories-260k"


@pytest.fixture(scope="module")
def gateway(tinystories_worker: WorkerProcess) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tinystories_worker.endpoint)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def oai(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oll(gateway: GatewayProcess) -> ollama.Client:
    return ollama.Client(host=gateway.url)


def direct(
    endpoint: str,
    prompt: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    **params: Any,
) -> GenerationResult:
    """The same request straight through AsyncClient: the reference."""

    async def run() -> GenerationResult:
        async with AsyncClient(endpoint) as client:
            return await client.generate(
                prompt,
                messages=[ChatMessage.from_dict(m) for m in messages] if messages else None,
                parameters=GenerationParameters(**params),
            )

    return asyncio.run(run())


def frames_sent(endpoint: str) -> int:
    async def run() -> int:
        async with AsyncClient(endpoint) as client:
            return (await client.info()).frames_sent or 0

    return asyncio.run(run())


def ping(endpoint: str) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        async with AsyncClient(endpoint) as client:
            pong = await client.ping()
            return pong.running, pong.waiting

    return asyncio.run(run())


HI = [{"role": "user", "content": "Hi"}]


def test_models_are_listed(gateway: GatewayProcess, oai: openai.OpenAI, oll: ollama.Client) -> None:
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    assert [m.model for m in oll.list().models] == [MODEL + ":latest"]
    assert [m.model for m in oll.ps().models] == [MODEL + ":latest"]
    show = oll.show(MODEL)
    assert show.modelinfo is not None and show.modelinfo["llama.context_length"] == 512
    assert show.capabilities == ["completion"]  # no tools in its template, no FIM tokens
    assert "{{ .Prompt }}" in (show.template or "")
    assert httpx.get(gateway.url + "/api/version").json()["version"]


def test_chat_buffered_and_streamed_match_async_client(
    oai: openai.OpenAI, tinystories_worker: WorkerProcess
) -> None:
    ref = direct(tinystories_worker.endpoint, messages=HI, max_tokens=40, temperature=0.0)
    assert ref.text and ref.finish_reason == "length"
    reply = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.message.content == ref.text
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == ref.prompt_tokens
    assert reply.usage.completion_tokens == len(ref.generated_tokens) == 40
    assert reply.usage.total_tokens == ref.prompt_tokens + 40

    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=HI,
            max_completion_tokens=40,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details is not None
    # The worker's count of prompt tokens served from its cache (stats.cached_prompt_tokens).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == ref.stats.cached_prompt_tokens


def test_response_format_reaches_the_worker(oai: openai.OpenAI) -> None:
    """A JSON schema through the official client comes back as JSON that validates."""
    import json

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=HI,  # type: ignore[arg-type]
        max_tokens=40,
        temperature=0.8,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    assert json.loads(choice.message.content or "") in ({"answer": "yes"}, {"answer": "no"})


def test_completions_match_async_client_with_stop(
    oai: openai.OpenAI, tinystories_worker: WorkerProcess
) -> None:
    prompt = "Once upon a time"
    ref = direct(tinystories_worker.endpoint, prompt, max_tokens=30, temperature=0.0)
    reply = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
    assert reply.choices[0].text == ref.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.prompt_tokens == ref.prompt_tokens

    stop = ref.text.split()[3]  # a word the greedy text reaches: it ends with "stop"
    stopped = direct(
        tinystories_worker.endpoint, prompt, max_tokens=30, temperature=0.0, stop=[stop]
    )
    assert stopped.finish_reason == "stop"
    stream = oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == stopped.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]

    echoed = oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + ref.text


def test_n_choices_use_consecutive_seeds(
    oai: openai.OpenAI, tinystories_worker: WorkerProcess
) -> None:
    reply = oai.completions.create(
        model=MODEL, prompt="Lily", max_tokens=12, temperature=1.0, seed=5, n=3
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        ref = direct(
            tinystories_worker.endpoint,
            "Lily",
            max_tokens=12,
            temperature=1.0,
            seed=5 + choice.index,
        )
        assert choice.text == ref.text
    assert reply.usage is not None and reply.usage.completion_tokens == 36
    texts = {c.text for c in reply.choices}
    assert len(texts) > 1  # different seeds: different samples

    streamed: dict[int, str] = {}
    for chunk in oai.completions.create(
        model=MODEL, prompt="Lily", max_tokens=12, temperature=1.0, seed=5, n=3, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in reply.choices}


def test_ollama_generate_and_chat_match_async_client(
    oll: ollama.Client, tinystories_worker: WorkerProcess
) -> None:
    options = {"temperature": 0, "num_predict": 25}
    ref = direct(tinystories_worker.endpoint, "Once upon a time", max_tokens=25, temperature=0.0)
    raw = oll.generate(MODEL, "Once upon a time", raw=True, options=options)
    assert raw.response == ref.text
    assert raw.done and raw.done_reason == "length"
    assert raw.eval_count == 25 and raw.prompt_eval_count == ref.prompt_tokens
    streamed = list(oll.generate(MODEL, "Once upon a time", raw=True, options=options, stream=True))
    assert "".join(p.response for p in streamed) == ref.text
    assert streamed[-1].done and not any(p.done for p in streamed[:-1])

    chat_ref = direct(tinystories_worker.endpoint, messages=HI, max_tokens=25, temperature=0.0)
    # Not raw: the prompt goes through the chat template as a user turn.
    templated = oll.generate(MODEL + ":latest", "Hi", options=options)
    assert templated.response == chat_ref.text
    reply = oll.chat(MODEL, messages=HI, options=options)
    assert reply.message.role == "assistant" and reply.message.content == chat_ref.text
    parts = list(oll.chat(MODEL, messages=HI, options=options, stream=True, keep_alive="5m"))
    assert "".join(p.message.content or "" for p in parts) == chat_ref.text
    assert parts[-1].done_reason == "length"


def test_ollama_options_reach_the_worker(
    oll: ollama.Client, tinystories_worker: WorkerProcess
) -> None:
    sampling = {"temperature": 1.0, "seed": 7, "top_k": 5, "top_p": 0.9}
    ref = direct(
        tinystories_worker.endpoint,
        "Once upon a time",
        max_tokens=30,
        repetition_penalty=1.5,
        **sampling,
    )
    options = {
        **sampling,
        "num_predict": 30,
        "repeat_penalty": 1.5,
        "num_ctx": 512,
        "num_thread": 2,
    }
    assert oll.generate(MODEL, "Once upon a time", raw=True, options=options).response == ref.text
    plain = direct(tinystories_worker.endpoint, "Once upon a time", max_tokens=30, **sampling)
    assert plain.text != ref.text  # the penalty changed the text: it was not dropped


def test_disconnect_mid_stream_cancels_on_the_worker(
    gateway: GatewayProcess, tinystories_worker: WorkerProcess
) -> None:
    before = _metric(gateway, "ffai_gateway_cancels_total")
    frames_before = frames_sent(tinystories_worker.endpoint)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 480,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in seen)
    # The stream was abandoned a few tokens in of 480: the worker must drop it now.
    _wait(lambda: ping(tinystories_worker.endpoint) == (0, 0), 3.0)
    assert _metric(gateway, "ffai_gateway_cancels_total") == before + 1
    # Far fewer than the 480 token frames a finished generation sends: it was stopped early.
    assert frames_sent(tinystories_worker.endpoint) - frames_before < 240


def test_metrics(gateway: GatewayProcess, oai: openai.OpenAI) -> None:
    oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    text = httpx.get(gateway.url + "/metrics").text
    assert 'ffai_gateway_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "ffai_gateway_time_to_first_token_seconds_count" in text
    assert f'ffai_worker_up{{model="{MODEL}"}} 1.0' in text
    assert f'ffai_worker_running{{model="{MODEL}"}}' in text
    assert _metric(gateway, "ffai_gateway_completion_tokens_total") >= 2


def _metric(gateway: GatewayProcess, name: str) -> float:
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _wait(condition: Any, bound: float) -> None:
    import time

    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_text_passes_the_tool_call_parser_unchanged(
    oai: openai.OpenAI, tinystories_worker: WorkerProcess
) -> None:
    """With tools, text that holds no call comes out exactly (held back, never lost)."""
    ref = direct(tinystories_worker.endpoint, messages=HI, max_tokens=60, temperature=0.0)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=HI,
        tools=[tool],
        max_tokens=60,
        temperature=0,  # type: ignore[arg-type, list-item]
    )
    assert reply.choices[0].message.content == ref.text
    assert reply.choices[0].finish_reason == "length" and not reply.choices[0].message.tool_calls
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=HI,
        tools=[tool],
        max_tokens=60,
        temperature=0,
        stream=True,  # type: ignore[arg-type, list-item]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_worker_serve_http_runs_and_stops_the_gateway() -> None:
    from gateway_process import free_port

    port = free_port()
    worker = WorkerProcess(TINYSTORIES, "--http", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _answers(url + "/v1/models"), 30.0)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == MODEL
    finally:
        assert worker.stop() == 0
    assert not _answers(url + "/v1/models")  # the gateway went with its worker


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
