"""Token and prompt log-probabilities against transformers, and structured output over the wire."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import checkpoints
import pytest
import torch
from conftest import TINYSTORIES, TOKENIZERS, WorkerProcess

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client import Client
from ffai_client.errors import InvalidParameters
from ffai_client.types import GenerationParameters, GenerationResult
from ffai_worker.engine import Engine, EngineConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-lp")
    checkpoints.build_checkpoint("qwen2", folder, vocab_size=151936, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "qwen2.5" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def engine(qwen_folder: Path) -> Engine:
    return Engine.load(qwen_folder, config=EngineConfig(max_batch=4, prefill_step_size=16))


@pytest.fixture(scope="module")
def reference(qwen_folder: Path) -> Any:
    return checkpoints.load_reference(qwen_folder)


def oracle(reference: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits at every position: (len(ids), V)."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_against(reference: Any, prompt_ids: list[int], result: GenerationResult, n: int) -> None:
    assert result.logprobs is not None
    ids = prompt_ids + result.generated_tokens
    expected = oracle(reference, ids)
    assert len(result.logprobs) == len(result.generated_tokens)
    for i, entry in enumerate(result.logprobs):
        row = expected[len(prompt_ids) - 1 + i]
        assert entry.token == result.generated_tokens[i]
        assert abs(entry.logprob - row[entry.token].item()) < TOL
        values, ids_ = torch.topk(row, n)
        assert len(entry.top) == n
        for alt, value, tid in zip(entry.top, values.tolist(), ids_.tolist(), strict=True):
            assert abs(alt.logprob - value) < TOL
            assert abs(row[alt.token].item() - alt.logprob) < TOL  # ties may swap ids
            assert alt.token == tid or abs(row[tid].item() - value) < TOL
        if entry.token == entry.top[0].token:  # texts are the token's own, wherever listed
            assert entry.text == entry.top[0].text


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.0),
        # Before temperature and truncation: the same numbers however the draw is shaped.
        dict(temperature=1.7, top_k=7, top_p=0.8, seed=5),
    ],
)
def test_logprobs_match_transformers(engine: Engine, reference: Any, kw: dict[str, Any]) -> None:
    prompt = "The quick brown fox"
    prompt_ids = engine.tokenize(prompt)
    params = GenerationParameters(max_tokens=12, logprobs=5, **kw)
    result = engine.generate(prompt, parameters=params)
    check_against(reference, prompt_ids, result, 5)


def test_logprobs_include_the_logit_bias(engine: Engine, reference: Any) -> None:
    prompt_ids = engine.tokenize("Hello there")
    bias = {11: 3.0, 220: -2.0}
    params = GenerationParameters(max_tokens=4, temperature=0, logprobs=2, logit_bias=bias)
    result = engine.generate(tokens=prompt_ids, parameters=params)
    assert result.logprobs is not None
    ids = prompt_ids + result.generated_tokens
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()
    for token, b in bias.items():
        logits[:, token] += b
    expected = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(result.logprobs):
        assert abs(entry.logprob - expected[len(prompt_ids) - 1 + i][entry.token].item()) < TOL


def test_prompt_logprobs_match_transformers(engine: Engine, reference: Any) -> None:
    # 40 tokens in chunks of 16: scores cross chunk boundaries.
    text = "Once upon a time there was a little robot who liked to count the stars every night"
    prompt_ids = engine.tokenize(text * 3)[:40]
    params = GenerationParameters(max_tokens=2, temperature=0, prompt_logprobs=True)
    result = engine.generate(tokens=prompt_ids, parameters=params)
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == 39
    expected = oracle(reference, prompt_ids)
    for i, value in enumerate(result.prompt_logprobs):
        assert abs(value - expected[i][prompt_ids[i + 1]].item()) < TOL
    plain = engine.generate(
        tokens=prompt_ids, parameters=GenerationParameters(max_tokens=2, temperature=0)
    )
    assert plain.generated_tokens == result.generated_tokens and plain.prompt_logprobs is None


def test_constrained_logprobs_are_over_the_allowed_tokens(engine: Engine) -> None:
    fmt = {"type": "choice", "choices": ["red", "green", "blue"]}
    params = GenerationParameters(
        max_tokens=8, temperature=1.0, seed=1, logprobs=20, response_format=fmt
    )
    result = engine.generate("Color:", parameters=params)
    assert result.text in fmt["choices"] and result.logprobs
    first = result.logprobs[0]
    assert first.top and len(first.top) < 20  # only the few tokens the grammar allows
    assert abs(sum(math.exp(t.logprob) for t in first.top) - 1.0) < 1e-4
    allowed = {"red", "green", "blue", "r", "g", "b", "re", "gr", "gre", "bl", "blu", "gree"}
    assert all(t.text in allowed for t in first.top), [t.text for t in first.top]


def test_no_logprobs_unless_asked(engine: Engine) -> None:
    result = engine.generate("Hi", parameters=GenerationParameters(max_tokens=3))
    assert result.logprobs is None and result.prompt_logprobs is None
    zero = engine.generate("Hi", parameters=GenerationParameters(max_tokens=3, logprobs=0))
    assert zero.logprobs is not None and all(not e.top for e in zero.logprobs)


# -- over the wire ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Any:
    w = WorkerProcess(TINYSTORIES, "--max-batch", "4")
    yield w
    w.stop()


def test_wire_logprobs_and_formats(worker: WorkerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    with Client(worker.endpoint) as client:
        params = GenerationParameters(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=True)
        result = client.generate("Once upon a time", parameters=params)
        assert result.logprobs is not None and len(result.logprobs) == len(result.generated_tokens)
        assert [e.token for e in result.logprobs] == result.generated_tokens
        assert all(
            len(e.top) == 3 and e.top[0].logprob >= e.top[2].logprob for e in result.logprobs
        )
        assert (
            result.prompt_logprobs is not None
            and len(result.prompt_logprobs) == result.prompt_tokens - 1
        )
        fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        for seed in range(3):
            p = GenerationParameters(max_tokens=30, temperature=1.0, seed=seed, response_format=fmt)
            out = client.generate("Lily", parameters=p)
            assert out.finish_reason == "stop" and 0 <= json.loads(out.text)["n"] <= 99


@pytest.mark.parametrize(
    "fmt,named",
    [
        ({"type": "regex", "pattern": "[a-"}, "regex"),
        (
            {
                "type": "json_schema",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
            },
            "/x",
        ),
    ],
)
def test_wire_bad_formats_are_invalid_parameters(
    worker: WorkerProcess, fmt: dict, named: str
) -> None:
    with Client(worker.endpoint) as client:
        with pytest.raises(InvalidParameters, match="response_format") as info:
            client.generate("x", parameters=GenerationParameters(response_format=fmt))
        assert named in str(info.value)
        assert client.generate("x", parameters=GenerationParameters(max_tokens=2)).generated_tokens
