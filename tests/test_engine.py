"""The in-process engine: exact greedy output, exact text, stopping, stats, one loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import checkpoints
import pytest
from conftest import TINYSTORIES

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.engine.sequence import RequestRejected
from ffai_worker.engine.types import RequestKey

KEY = RequestKey(b"test", "k")
PROMPTS = ["Once upon a time", "Lily and Ben", "The cat"]
GREEDY = GenerationParameters(temperature=0.0, max_tokens=200, stop_on_eos=False)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(TINYSTORIES, config=EngineConfig(max_batch=8, max_queue=4))


@pytest.fixture(scope="module")
def hf_model() -> Iterator[Any]:
    """tinystories as a float32 transformers model: the oracle."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: extra threads only add contention
    yield checkpoints.load_reference(TINYSTORIES)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TINYSTORIES / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_greedy(hf_model: Any, hf_tokenizer: Any) -> dict[str, list[int]]:
    """transformers' greedy continuation (200 tokens, EOS ignored) for each prompt."""
    import torch

    out = {}
    for prompt in PROMPTS:
        ids = torch.tensor([hf_tokenizer.encode(prompt).ids])
        with torch.no_grad():
            gen = hf_model.generate(
                ids,
                max_new_tokens=200,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                min_new_tokens=200,
            )
        out[prompt] = gen[0, ids.shape[1] :].tolist()
    return out


def hf_text(hf_tokenizer: Any, prompt: str, generated: list[int]) -> str:
    """The text `generated` adds after `prompt`, decoded as a whole by the tokenizers library."""
    full = hf_tokenizer.decode(hf_tokenizer.encode(prompt).ids + generated)
    assert full.startswith(prompt)
    return full[len(prompt) :]


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


def test_leading_space_survives_streaming(
    engine: Engine, hf_greedy: dict[str, list[int]], hf_tokenizer: Any
) -> None:
    chunks = list(engine.generate_stream("Lily and Ben", parameters=GREEDY))
    text = "".join(c.text for c in chunks)
    assert text.startswith(" ")  # "Lily and Ben were ..." keeps its space
    assert text == hf_text(hf_tokenizer, "Lily and Ben", hf_greedy["Lily and Ben"])
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


def test_multi_token_stop_string_ends_the_stream_at_its_start(
    engine: Engine, hf_greedy: dict[str, list[int]], hf_tokenizer: Any
) -> None:
    """A stop string that starts and ends inside tokens and spans several of them.

    Its first two characters ("ay", in " play") occur earlier, so that text is
    held back and must still be released; the stream must end exactly where
    the match starts, on the token that completes it.
    """
    prompt, stop = "Once upon a time", "ay, she sa"
    gen = hf_greedy[prompt]
    free = hf_text(hf_tokenizer, prompt, gen)  # "..., she saw a big, ..." from transformers
    start = free.index(stop)
    end = start + len(stop)
    ends = [len(hf_text(hf_tokenizer, prompt, gen[:n])) for n in range(len(gen) + 1)]
    first = next(n for n in range(len(gen)) if ends[n + 1] > start)  # token holding "a" of "ay"
    last = next(n for n in range(len(gen)) if ends[n + 1] >= end)  # token completing the match
    assert start not in ends and end not in ends  # straddles token boundaries on both sides
    assert last - first >= 3 and first >= 20  # several tokens, well into the generation
    assert stop[:2] in free[:start] and stop[:3] not in free[:start]  # a partial match before
    params = GenerationParameters(temperature=0.0, max_tokens=200, stop=[stop], stop_on_eos=False)
    chunks = list(engine.generate_stream(prompt, parameters=params))
    final = chunks[-1]
    assert final.is_final and final.finish_reason == "stop"
    text = "".join(c.text for c in chunks)
    assert text == free[:start]
    assert stop not in text and stop[:2] in text  # the partial match was released
    assert [t for c in chunks for t in c.tokens] == gen[: last + 1]


def test_banning_the_first_greedy_token_picks_transformers_second_best(
    engine: Engine, hf_model: Any, hf_tokenizer: Any
) -> None:
    """A -inf logit bias removes a token at every step; the oracle masks it in transformers."""
    import torch

    for prompt in ("Once upon a time", "The cat"):
        ids = hf_tokenizer.encode(prompt).ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1]
        top = logits.topk(3)
        banned, second = int(top.indices[0]), int(top.indices[1])
        assert top.values[1] - top.values[2] > 0.1  # second-best is not a near tie
        expected: list[int] = []
        with torch.no_grad():
            out = hf_model(torch.tensor([ids]), use_cache=True)
            for _ in range(24):
                logits = out.logits[0, -1].clone()
                logits[banned] = float("-inf")
                expected.append(int(logits.argmax()))
                out = hf_model(
                    torch.tensor([expected[-1:]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        assert expected[0] == second
        params = GenerationParameters(
            temperature=0.0,
            max_tokens=24,
            stop_on_eos=False,
            logit_bias={banned: float("-inf")},
        )
        result = engine.generate(prompt, parameters=params)
        assert result.generated_tokens == expected, prompt


def test_finish_reasons(engine: Engine, hf_model: Any) -> None:
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
    # Every token, up to the context's last position (511), is transformers' greedy one.
    n = engine.context_length - len(prompt_ids)
    assert full.generated_tokens == checkpoints.greedy_reference(hf_model, prompt_ids, n)


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


def test_cancel_with_a_token_in_flight_ends_at_the_last_streamed_token(engine: Engine) -> None:
    """The pipelined decode has launched a token when the cancel comes: it is never sent."""
    key = RequestKey(b"test", "in-flight")
    engine.submit(engine.new_request(key, prompt="Once upon a time", parameters=GREEDY))
    streamed: list[int] = []
    for _ in range(6):
        for out in engine.step():
            streamed += [t for chunk in out.chunks for t in chunk.tokens]
    assert engine.runner.in_flight and len(streamed) == 6
    assert engine.cancel(key)
    (out,) = engine.step()
    assert out.key == key and out.finished and not engine.runner.in_flight
    assert [t for chunk in out.chunks for t in chunk.tokens] == []
    final = out.chunks[-1]
    assert final.finish_reason == "cancelled" and final.stats is not None
    assert final.stats.generated_tokens == 6
    assert final.position == len(engine.tokenize("Once upon a time")) + 6
    assert not engine.has_work() and engine.cache.allocated_bytes == 0
    assert not engine.cancel(key)


def test_interleaved_in_process_streams_each_get_their_own_chunks(engine: Engine) -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=40, stop_on_eos=False)
    solo = {p: engine.generate(p, parameters=params).generated_tokens for p in PROMPTS}
    live = {p: engine.generate_stream(p, parameters=params) for p in PROMPTS}
    got: dict[str, list[int]] = {p: [] for p in PROMPTS}
    while live:  # each stream's next() steps the shared loop for all of them
        for prompt, stream in list(live.items()):
            chunk = next(stream, None)
            if chunk is None:
                del live[prompt]
            else:
                got[prompt] += chunk.tokens
    assert got == solo
    assert not engine.has_work()


def test_engine_imports_from_the_package_after_the_blas_setup() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ffai_worker\n"
        "assert 'mlx.core' not in sys.modules  # the BLAS swap happens before MLX loads\n"
        "from ffai_worker import Engine, RequestKey, StepOutput\n"
        "import ffai_worker.engine as e\n"
        "assert Engine is e.Engine and 'mlx.core' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bad_requests_are_rejected_with_codes(engine: Engine) -> None:
    with pytest.raises(RequestRejected) as exc:
        engine.new_request(KEY, tokens=list(range(10)) * 60)
    assert exc.value.code == "prompt_too_long"
    with pytest.raises(RequestRejected) as exc:
        engine.new_request(KEY, tokens=[1, 99999])
    assert exc.value.code == "invalid_request"
    with pytest.raises(RequestRejected) as exc:
        engine.new_request(KEY, prompt="a", tokens=[1])
    assert exc.value.code == "invalid_request"
