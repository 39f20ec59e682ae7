"""The production path against transformers, per architecture.

test_models.py proves each model's forward pass; this proves what serves
requests: `Engine` with its SlotCache, the batched decoder (compiled and
eager), batched and chunked prefill and the scheduler's joins and leaves. Every
row's greedy tokens must equal transformers' greedy continuation of the same
prompt ids.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import checkpoints
import pytest
from conftest import TINYSTORIES

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig
from ffai_worker.engine.decoder import BatchedDecoder
from ffai_worker.engine.types import RequestKey
from ffai_worker.native import quant

N_TOKENS = 48
GREEDY = GenerationParameters(temperature=0.0, max_tokens=N_TOKENS, stop_on_eos=False)
VOCAB = 512  # the tinystories tokenizer's

# name -> (builder, weight seed). Seeds picked so every reference row varies (> 10 distinct ids).
ARCHS: dict[str, tuple[Callable[..., Path], int]] = {
    "llama3_scaled": (checkpoints.build_llama3_scaled, 3),  # prompt + output pass its 32 positions
    "mistral": (checkpoints.build_mistral, 3),  # every layer windowed (12 positions)
    "qwen2": (checkpoints.build_qwen2, 0),
    "qwen3": (checkpoints.build_qwen3, 0),
    "phi3": (checkpoints.build_phi3, 0),  # LongRoPE, partial rotary, windowed
    # Soft-capping, sliding/global layers. Untied: a tiny random Gemma with tied
    # embeddings repeats one token (test_models.py covers the tied form).
    "gemma2": (partial(checkpoints.build_gemma2, tie_word_embeddings=False), 0),
    "gemma3_text": (partial(checkpoints.build_gemma3_text, tie_word_embeddings=False), 0),
}

_WORDS = (
    "Once upon a time there was a little dog named Max who liked to play in the big green park"
    " with his friends Lily and Ben every sunny day after school until the sun went down"
).split()
SOLO_PROMPTS = ["The cat", " ".join(_WORDS[:12]), " ".join(_WORDS)]
BATCH_PROMPTS = [" ".join(_WORDS[: 1 + 4 * i]) for i in range(8)]  # 1 to 29 words


@dataclass
class Arch:
    engine: Engine
    reference: Any  # the transformers model
    expected: dict[str, list[int]]  # prompt -> transformers' greedy ids
    decoders: dict[tuple[bool, bool], BatchedDecoder] = field(default_factory=dict)

    def use(self, compiled: bool, native: bool = True) -> BatchedDecoder:
        """Decode compiled or eagerly from now on (one decoder each, so traces are kept);
        `native=False` is for a test that turned the native kernels off."""
        decoder = self.decoders.get((compiled, native))
        if decoder is None:
            engine = self.engine
            decoder = BatchedDecoder(engine.model, engine.cache, compiled=compiled)
            self.decoders[compiled, native] = decoder
        self.engine.runner.decoder = decoder
        return decoder

    def check_attention_path(self, decoder: BatchedDecoder, native: bool) -> None:
        """The decode step's attention ran where it should: natively in every layer when
        the kernels are loaded (quant.native_ops), else as MLX ops."""
        on = native and quant.native_ops() is not None
        assert decoder.fused_layers == (self.engine.model.num_layers if on else 0)
        if on:  # one trace for every length (after the first step's), no width retraces
            assert 0 in decoder._traces and len(decoder._traces) <= 2


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Arch:
    import torch
    from tokenizers import Tokenizer

    name = request.param
    build, seed = ARCHS[name]
    folder = build(tmp_path_factory.mktemp(name), vocab_size=VOCAB, seed=seed)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINYSTORIES / file, folder / file)
    engine = Engine.load(folder, config=EngineConfig(max_batch=8, max_queue=16))
    reference = checkpoints.load_reference(folder)
    hf_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: extra threads only add contention
    try:
        for prompt in dict.fromkeys(SOLO_PROMPTS + BATCH_PROMPTS):
            ids = engine.tokenize(prompt)
            assert ids == hf_tokenizer.encode(prompt).ids and ids[0] == 1  # BOS, then the text
            expected[prompt] = checkpoints.greedy_reference(reference, ids, N_TOKENS)
            # A row that repeats a few tokens would hide mixed-up rows, offsets or masks.
            assert len(set(expected[prompt])) > 10, (name, prompt, expected[prompt])
    finally:
        torch.set_num_threads(threads)
    return Arch(engine, reference, expected)


def run_batch(
    engine: Engine, requests: dict[str, dict[str, Any]], stagger: int = 0
) -> dict[str, list[int]]:
    """Submit all requests at once (or one every `stagger` steps); step until all finish."""
    pending = list(requests.items())
    tokens: dict[str, list[int]] = {name: [] for name in requests}
    finish: dict[str, str | None] = {}
    steps = 0
    while pending or engine.has_work():
        if pending and (stagger == 0 or steps % stagger == 0):
            batch, pending = (pending, []) if stagger == 0 else (pending[:1], pending[1:])
            for name, kwargs in batch:
                engine.submit(engine.new_request(RequestKey(b"parity", name), **kwargs))
        for out in engine.step():
            for chunk in out.chunks:
                tokens[out.key.request_id].extend(chunk.tokens)
                if chunk.is_final:
                    finish[out.key.request_id] = chunk.finish_reason
        steps += 1
    assert finish == dict.fromkeys(requests, "length")
    assert engine.cache.allocated_bytes == 0
    return tokens


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_solo_greedy_matches_transformers(arch: Arch, compiled: bool) -> None:
    decoder = arch.use(compiled)
    for prompt in SOLO_PROMPTS:
        result = arch.engine.generate(prompt, parameters=GREEDY)
        assert result.generated_tokens == arch.expected[prompt], prompt
        assert result.finish_reason == "length"
    assert decoder.compiled is compiled  # no silent fallback to eager
    arch.check_attention_path(decoder, native=True)


@pytest.mark.parametrize("mode", ["solo", "together"])
def test_greedy_matches_transformers_without_native_kernels(
    arch: Arch, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLX's own ops (the macOS and GPU path): the decode attention as MLX graph nodes."""
    monkeypatch.setenv(quant.ENV_VAR, "0")
    decoder = arch.use(compiled=True, native=False)
    if mode == "solo":
        for prompt in SOLO_PROMPTS:
            assert (
                arch.engine.generate(prompt, parameters=GREEDY).generated_tokens
                == (arch.expected[prompt])
            )
    else:
        requests = {p: {"prompt": p, "parameters": GREEDY} for p in BATCH_PROMPTS}
        got = run_batch(arch.engine, requests)
        assert got == {p: arch.expected[p] for p in BATCH_PROMPTS}
    arch.check_attention_path(decoder, native=False)


@pytest.mark.parametrize("mode", ["together", "staggered", "chunked"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_batched_greedy_matches_transformers(arch: Arch, compiled: bool, mode: str) -> None:
    """8 rows of different lengths: grouped prefill, joins mid-decode, or chunked prefill.

    "staggered" submits one request every 3 steps, so rows join while others
    decode and leave at different steps (slots move). "chunked" prefills every
    other prompt 5 tokens per step alongside decoding rows.
    """
    decoder = arch.use(compiled)
    requests: dict[str, dict[str, Any]] = {}
    for i, prompt in enumerate(BATCH_PROMPTS):
        params = GREEDY
        if mode == "chunked" and i % 2:
            params = GenerationParameters(
                temperature=0.0, max_tokens=N_TOKENS, stop_on_eos=False, prefill_step_size=5
            )
        requests[prompt] = {"prompt": prompt, "parameters": params}
    got = run_batch(arch.engine, requests, stagger=3 if mode == "staggered" else 0)
    for prompt in BATCH_PROMPTS:
        assert got[prompt] == arch.expected[prompt], prompt
    assert decoder.compiled is compiled
    arch.check_attention_path(decoder, native=True)
