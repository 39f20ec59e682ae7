"""The in-process engine: exact greedy output, exact text, stopping, stats, one loop."""

from __future__ import annotations

import pytest
from conftest import TINYSTORIES

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.sequence import RequestRejected

PROMPTS = ["Once upon a time", "Lily and Ben", "The cat"]
GREEDY = GenerationParameters(temperature=0.0, max_tokens=200, stop_on_eos=False)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(TINYSTORIES, config=EngineConfig(max_batch=8, max_queue=4))


@pytest.fixture(scope="module")
def hf_greedy() -> dict[str, list[int]]:
    """transformers' greedy continuation (200 tokens, EOS ignored) for each prompt."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(TINYSTORIES / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(TINYSTORIES, torch_dtype=torch.float32)
    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=200,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                min_new_tokens=200,
            )
        out[prompt] = gen[0, ids.shape[1] :].tolist()
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_and_text_is_exact(
    engine: Engine, hf_greedy: dict[str, list[int]], prompt: str
) -> None:
    from tokenizers import Tokenizer

    result = engine.generate(prompt, parameters=GREEDY)
    assert result.generated_tokens == hf_greedy[prompt]
    tok = Tokenizer.from_file(str(TINYSTORIES / "tokenizer.json"))
    prompt_ids = tok.encode(prompt).ids
    full = tok.decode(prompt_ids + result.generated_tokens, skip_special_tokens=True)
    assert prompt + result.text == full
    assert result.finish_reason == "length"


def test_leading_space_survives_streaming(engine: Engine) -> None:
    chunks = list(engine.generate_stream("Lily and Ben", parameters=GREEDY))
    text = "".join(c.text for c in chunks)
    assert text.startswith(" ")  # "Lily and Ben were ..." keeps its space
    assert "".join(c.text for c in chunks[:-1]) == text
    final = chunks[-1]
    assert final.is_final and final.text == "" and final.tokens == []
    assert [c.position for c in chunks[:-1]] == sorted(c.position for c in chunks[:-1])


def test_stop_string_is_never_emitted(engine: Engine) -> None:
    free = engine.generate("Once upon a time", parameters=GREEDY).text
    stop = "Lily"
    assert stop in free
    params = GenerationParameters(temperature=0.0, max_tokens=200, stop=[stop])
    pieces = [c.text for c in engine.generate_stream("Once upon a time", parameters=params)]
    text = "".join(pieces)
    assert stop not in text
    assert text == free[: free.index(stop)]


def test_finish_reasons(engine: Engine) -> None:
    # Greedy tinystories runs past 256 tokens from these prompts without an EOS, so
    # "stop" is driven by a stop token id taken from the free-running output.
    prompt = "Once upon a time"
    free = engine.generate(prompt, parameters=GenerationParameters(temperature=0, max_tokens=30))
    stop_at = free.generated_tokens[12]
    first = free.generated_tokens.index(stop_at)
    params = GenerationParameters(temperature=0, stop_token_ids=[stop_at])
    stopped = engine.generate(prompt, parameters=params)
    assert stopped.finish_reason == "stop"
    assert stopped.generated_tokens == free.generated_tokens[: first + 1]
    short = engine.generate("The cat", parameters=GenerationParameters(temperature=0, max_tokens=3))
    assert short.finish_reason == "length" and len(short.generated_tokens) == 3
    prompt_ids = engine.tokenize("The cat sat. " * 60)[:500]
    full = engine.generate(tokens=prompt_ids, parameters=GREEDY)
    assert full.finish_reason == "length"
    assert len(prompt_ids) + len(full.generated_tokens) == engine.context_length


def test_seeded_sampling_reproduces(engine: Engine) -> None:
    params = GenerationParameters(temperature=1.0, top_p=0.9, seed=1234, max_tokens=40)
    a = engine.generate("The cat", parameters=params).generated_tokens
    b = engine.generate("The cat", parameters=params).generated_tokens
    c = engine.generate(
        "The cat", parameters=GenerationParameters(temperature=1.0, seed=99, max_tokens=40)
    )
    assert a == b
    assert a != c.generated_tokens


def test_stats_are_measured(engine: Engine) -> None:
    result = engine.generate(
        "Once upon a time",
        parameters=GenerationParameters(temperature=0, max_tokens=30, stop_on_eos=False),
    )
    s = result.stats
    assert s.prompt_tokens == len(engine.tokenize("Once upon a time"))
    assert s.generated_tokens == 30 == len(result.generated_tokens)
    assert s.context_size == 512
    assert s.prefill_time_s > 0 and s.decode_time_s > 0 and s.time_to_first_token_ms > 0
    assert s.steady_tokens_per_second is not None and s.steady_tokens_per_second > 0
    assert s.weights_bytes > 0
    assert s.kv_cache_allocated_bytes >= s.kv_cache_used_bytes > 0
    assert s.baseline_memory_bytes > 0 and s.decode_peak_memory_bytes > 0
    assert "[STATS]" in s.formatted()


def test_closing_the_stream_cancels_and_frees_the_cache(engine: Engine) -> None:
    stream = engine.generate_stream("Once upon a time", parameters=GREEDY)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()
    assert not engine.has_work()
    assert engine.cache.allocated_bytes == 0


def test_bad_requests_are_rejected_with_codes(engine: Engine) -> None:
    with pytest.raises(RequestRejected) as exc:
        engine.new_request("k", tokens=list(range(10)) * 60)
    assert exc.value.code == "prompt_too_long"
    with pytest.raises(RequestRejected) as exc:
        engine.new_request("k", tokens=[1, 99999])
    assert exc.value.code == "invalid_request"
    with pytest.raises(RequestRejected) as exc:
        engine.new_request("k", prompt="a", tokens=[1])
    assert exc.value.code == "invalid_request"
