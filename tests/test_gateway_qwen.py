"""The gateway on a model with Qwen2.5's tokenizer and chat template: FIM and tools.

The weights are random (the text is noise), but prompts are exact: the FIM
prompt is the model's FIM tokens around the prefix and suffix, and tools and
tool-call messages reach the chat template.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from conftest import TOKENIZERS, WorkerProcess
from gateway_process import GatewayProcess

from ffai_client import AsyncClient, ChatMessage, ChatTemplateOptions, GenerationParameters
from ffai_client.gateway.toolcalls import HermesParser, ToolCall
from ffai_client.gateway.workers import WorkerHandle

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = 151659, 151660, 151661
TOOL_CALL, END_TOOL_CALL = 151657, 151658
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("qwen-like")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=151645,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "qwen2.5" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def worker(qwen_like: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(qwen_like)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(worker: WorkerProcess) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(worker.endpoint)
    yield gw
    gw.stop()


def on_worker(endpoint: str, work: Any) -> Any:
    async def run() -> Any:
        async with AsyncClient(endpoint) as client:
            return await work(client)

    return asyncio.run(run())


def test_capabilities(gateway: GatewayProcess) -> None:
    show = ollama.Client(host=gateway.url).show("qwen-like0")
    assert show.capabilities is not None
    assert {"completion", "tools", "insert"} <= set(show.capabilities)


def test_fim_prompt_is_the_models_fim_tokens_around_prefix_and_suffix(
    gateway: GatewayProcess, worker: WorkerProcess
) -> None:
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"

    async def expected(client: AsyncClient) -> tuple[list[int], str]:
        tokens = [
            FIM_PREFIX,
            *await client.tokenize(prefix, add_special_tokens=False),
            FIM_SUFFIX,
            *await client.tokenize(suffix, add_special_tokens=False),
            FIM_MIDDLE,
        ]
        params = GenerationParameters(max_tokens=8, temperature=0.0)
        return tokens, (await client.generate(tokens=tokens, parameters=params)).text

    tokens, text = on_worker(worker.endpoint, expected)
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    reply = oai.completions.create(
        model="qwen-like0", prompt=prefix, suffix=suffix, max_tokens=8, temperature=0
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == len(tokens)
    assert reply.choices[0].text == text
    olla = ollama.Client(host=gateway.url).generate(
        "qwen-like0", prefix, suffix=suffix, options={"temperature": 0, "num_predict": 8}
    )
    assert olla.response == text and olla.prompt_eval_count == len(tokens)


def test_tools_and_tool_messages_reach_the_template(
    gateway: GatewayProcess, worker: WorkerProcess
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    # What the template gets: arguments as an object (as HF templates expect).
    templated = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                {
                    "type": "function",
                    "id": "call_1",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        ),
        ChatMessage(role="tool", content="18 C", tool_call_id="call_1"),
    ]

    async def render(client: AsyncClient) -> tuple[Any, Any]:
        with_tools = await client.render(templated, ChatTemplateOptions(tools=[WEATHER]))
        return with_tools, await client.render(templated)

    with_tools, without = on_worker(worker.endpoint, render)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in with_tools.text
    assert len(with_tools.tokens) > len(without.tokens)
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    reply = oai.chat.completions.create(
        model="qwen-like0",
        messages=messages,
        tools=[WEATHER],
        max_tokens=3,
        temperature=0,  # type: ignore[arg-type, list-item]
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == len(with_tools.tokens)
    plain = oai.chat.completions.create(
        model="qwen-like0",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=3,  # type: ignore[arg-type, list-item]
    )
    assert plain.usage is not None and plain.usage.prompt_tokens == len(without.tokens)


def test_special_tool_markers_are_restored_and_parsed(worker: WorkerProcess) -> None:
    """Qwen's <tool_call> tokens are special (skipped in text): the gateway puts them back."""

    async def run() -> list[Any]:
        handle = WorkerHandle(worker.endpoint, 5.0)
        try:
            fmt = await handle.tool_format()
            assert fmt.family == "hermes"
            assert fmt.special_markers == {TOOL_CALL: "<tool_call>", END_TOOL_CALL: "</tool_call>"}
            body = await handle.client.tokenize(
                '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
                add_special_tokens=False,
            )
            tokens = [
                *await handle.client.tokenize("Sure.", add_special_tokens=False),
                TOOL_CALL,
                *body,
                END_TOOL_CALL,
            ]
            parser = HermesParser()
            events: list[Any] = []
            # One token a chunk (as streamed), then all in one coalesced chunk.
            for token in tokens:
                text = await handle.client.detokenize([token])
                events += parser.feed(await handle.restore_markers(fmt, text, [token]))
            events += parser.finish()
            whole = await handle.restore_markers(
                fmt, await handle.client.detokenize(tokens), tokens
            )
            return [events, whole]
        finally:
            await handle.client.aclose()

    events, whole = on_worker(worker.endpoint, lambda _client: run())
    call = ToolCall("get_weather", json.dumps({"city": "Paris"}))
    assert [e for e in events if isinstance(e, ToolCall)] == [call]
    assert whole.startswith("Sure.<tool_call>\n{") and whole.endswith("}\n</tool_call>")
