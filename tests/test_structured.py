"""Structured output (response_format) in the engine: random-weight models, real tokenizers.

The models are random, so whatever they write is the model's own choice among
the tokens the grammar allows: any output that does not parse, or a batch
neighbour whose tokens change, is the constraint machinery's fault.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import checkpoints
import jsonschema
import pytest
from conftest import TOKENIZERS

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.engine.sequence import RequestRejected
from ffai_worker.engine.types import RequestKey

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pet", "ok", "tags"],
    "additionalProperties": False,
}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


def _engine(folder: Path, kind: str, tokenizer: str, vocab: int) -> Engine:
    checkpoints.build_checkpoint(kind, folder, vocab_size=vocab, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / tokenizer / name, folder / name)
    return Engine.load(folder, config=EngineConfig(max_batch=8, max_queue=32))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _engine(tmp_path_factory.mktemp("qwen"), "qwen2", "qwen2.5", 151936)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _engine(tmp_path_factory.mktemp("llama3"), "llama", "llama3", 128256)


@pytest.fixture(params=["qwen", "llama3"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def run_all(engine: Engine, requests: dict[str, dict]) -> dict[str, tuple[list[int], str, str]]:
    """Submit all at once, step until done: name → (tokens, text, finish_reason)."""
    out: dict[str, tuple[list[int], str, str]] = {}
    tokens: dict[str, list[int]] = {k: [] for k in requests}
    texts: dict[str, list[str]] = {k: [] for k in requests}
    for name, kwargs in requests.items():
        engine.submit(engine.new_request(RequestKey(b"t", name), **kwargs))
    while engine.has_work():
        for step in engine.step():
            name = step.key.request_id
            for chunk in step.chunks:
                tokens[name].extend(chunk.tokens)
                texts[name].append(chunk.text)
                if chunk.is_final:
                    assert chunk.finish_reason is not None
                    out[name] = (tokens[name], "".join(texts[name]), chunk.finish_reason)
    return out


def params(**kw: object) -> GenerationParameters:
    return GenerationParameters(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.5])
def test_json_schema_output_always_validates(engine: Engine, temperature: float) -> None:
    requests = {
        f"s{seed}": dict(
            prompt=f"Person {seed}:",
            parameters=params(
                max_tokens=160, temperature=temperature, seed=seed, response_format=JSON_FORMAT
            ),
        )
        for seed in range(6)
    }
    for name, (tokens, text, reason) in run_all(engine, requests).items():
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        # Complete JSON ends the sequence at once: no EOS needed, nothing after the object.
        assert engine.tokenizer.decode(tokens) == text


def test_json_object_and_top_k_top_p_penalties(qwen: Engine) -> None:
    fmt = {"type": "json_object"}
    requests = {
        f"o{seed}": dict(
            prompt="Object:",
            parameters=params(
                max_tokens=60,
                temperature=1.0,
                top_k=20,
                top_p=0.9,
                repetition_penalty=1.3,
                seed=seed,
                response_format=fmt,
            ),
        )
        for seed in range(4)
    }
    for _name, (_, text, reason) in run_all(qwen, requests).items():
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # out of tokens inside a long string: still a prefix of an object
            assert reason == "length" and text.startswith("{")


def test_unconstrained_rows_keep_their_tokens_next_to_constrained_ones(engine: Engine) -> None:
    plain = {
        "greedy": dict(prompt="Once upon a time", parameters=params(max_tokens=24, temperature=0)),
        "sampled": dict(
            prompt="The cat", parameters=params(max_tokens=24, temperature=1.0, seed=7)
        ),
        "logprobs": dict(
            prompt="Hello", parameters=params(max_tokens=24, temperature=0.7, seed=3, logprobs=3)
        ),
    }
    alone = {name: run_all(engine, {name: kw})[name] for name, kw in plain.items()}
    constrained = {
        f"c{seed}": dict(
            prompt="JSON:",
            parameters=params(
                max_tokens=40, temperature=1.0, seed=seed, response_format=JSON_FORMAT
            ),
        )
        for seed in range(3)
    }
    together = run_all(engine, {**plain, **constrained})
    for name in plain:
        assert together[name][0] == alone[name][0], name


def test_regex_and_choice_hold(engine: Engine) -> None:
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    choices = ["red", "green", "light blue", 'say "hi"']
    requests: dict[str, dict] = {}
    for seed in range(4):
        for kind, fmt in (
            ("re", {"type": "regex", "pattern": pattern}),
            ("ch", {"type": "choice", "choices": choices}),
        ):
            requests[f"{kind}{seed}"] = dict(
                prompt="Answer:",
                parameters=params(max_tokens=40, temperature=1.2, seed=seed, response_format=fmt),
            )
    for name, (_, text, reason) in run_all(engine, requests).items():
        assert reason == "stop", (name, text)
        if name.startswith("re"):
            assert re.fullmatch(pattern, text), text
        else:
            assert text in choices, text


def test_eos_is_allowed_exactly_when_the_grammar_accepts(qwen: Engine) -> None:
    # A strong push towards EOS: refused while no digit was written, taken right after one.
    eos = min(qwen.tokenizer.eos_token_ids)
    fmt = {"type": "regex", "pattern": "[0-9]+"}
    p = params(max_tokens=20, temperature=0, logit_bias={eos: 60.0}, response_format=fmt)
    tokens, text, reason = run_all(qwen, {"d": dict(prompt="Number:", parameters=p)})["d"]
    assert reason == "stop"
    assert re.fullmatch("[0-9]+", text)
    assert tokens[-1] == eos and len(tokens) == 2


def test_a_grammar_constraint_holds(qwen: Engine) -> None:
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-z]{1,3}/\n'
    fmt = {"type": "grammar", "lark": lark}
    requests = {
        f"g{seed}": dict(
            prompt="List:",
            parameters=params(max_tokens=60, temperature=1.0, seed=seed, response_format=fmt),
        )
        for seed in range(3)
    }
    for _, (_, text, reason) in run_all(qwen, requests).items():
        if reason == "stop":
            assert re.fullmatch(r"\([a-z]{1,3}(,[a-z]{1,3})*\)", text), text
        else:
            assert re.fullmatch(r"\([a-z,]*", text), text


BAD_FORMATS = [
    ({"type": "regex", "pattern": "(unclosed"}, "unclosed group"),
    ({"type": "grammar", "lark": "start: missing_rule\n"}, "missing_rule"),
    ({"type": "json_schema", "schema": {"type": "frobnicate"}}, "frobnicate"),
    ({"type": "json_schema", "schema": {"$ref": "#/nowhere"}}, "nowhere"),
]


@pytest.mark.parametrize("fmt,named", BAD_FORMATS)
def test_formats_that_cannot_compile_are_refused_at_admission(
    qwen: Engine, fmt: dict, named: str
) -> None:
    for _ in range(2):  # the second answer comes from the cache, and says the same
        with pytest.raises(RequestRejected) as info:
            bad = params(response_format=fmt)
            qwen.new_request(RequestKey(b"t", "bad"), prompt="x", parameters=bad)
        assert info.value.code == "invalid_parameters"
        assert named in info.value.message and "response_format" in info.value.message


def test_malformed_formats_fail_in_the_parameters() -> None:
    for fmt in (
        {"type": "yaml"},
        {"type": "regex"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "choice", "choices": ["a", ""]},
    ):
        with pytest.raises(ValueError, match="response_format"):
            params(response_format=fmt)
    with pytest.raises(ValueError, match="forced token"):
        params(response_format={"type": "json_object"}, logit_bias={5: float("inf")})
