"""Sampling: penalties by hand-computed vectors, truncation supports, seeds, batch invariance."""

from __future__ import annotations

import math
import random
from collections import Counter

# isort: off
import ffai_worker  # noqa: F401  (first: it preloads a fast BLAS before mlx loads)

# isort: on
import mlx.core as mx
import pytest

from ffai_client.types import GenerationParameters
from ffai_worker.engine.sampling import Sampler, TokenHistory, sample_batch

INF = math.inf
V6 = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]


def make(vocab: int = 6, default_temperature: float = 0.6, **params: object) -> Sampler:
    return Sampler(
        GenerationParameters(**params),  # type: ignore[arg-type]
        vocab_size=vocab,
        default_temperature=default_temperature,
    )


def history(prompt: list[int], generated: list[int] = ()) -> TokenHistory:  # type: ignore[assignment]
    h = TokenHistory(prompt)
    for t in generated:
        h.append(t)
    return h


def processed(sampler: Sampler, logits: list[float], h: TokenHistory) -> list[float]:
    return sampler.process_logits(mx.array(logits), h).tolist()


def draws(sampler: Sampler, logits: mx.array, n: int, h: TokenHistory | None = None) -> list[int]:
    h = h or TokenHistory([0])
    return [sampler.sample(logits, h).item() for _ in range(n)]


def logit_sequence(steps: int, vocab: int, seed: int = 0) -> list[mx.array]:
    key = mx.random.key(seed)
    return [mx.random.normal((vocab,), key=k) * 2.0 for k in mx.random.split(key, steps)]


# -- penalties, by hand ----------------------------------------------------------
def test_logit_bias_is_added() -> None:
    s = make(temperature=0.0, logit_bias={1: 2.5, 4: -1.0, 5: -INF})
    assert processed(s, V6, history([0])) == [2.0, 1.5, 0.5, 3.0, -3.0, -INF]


def test_repetition_penalty_sees_prompt_and_generated() -> None:
    # history 0 1 | 3 3 1: tokens {0, 1, 3}; positive logits divided, negative multiplied
    s = make(temperature=0.0, repetition_penalty=2.0)
    assert processed(s, V6, history([0, 1], [3, 3, 1])) == [1.0, -2.0, 0.5, 1.5, -2.0, 0.0]


def test_repetition_window_is_the_last_n_tokens() -> None:
    s = make(temperature=0.0, repetition_penalty=2.0, repetition_context_size=2)
    h = history([0, 1], [3, 3])  # window: 3 3
    assert processed(s, V6, h) == [2.0, -1.0, 0.5, 1.5, -2.0, 0.0]
    h.append(4)  # window: 3 4
    assert processed(s, V6, h) == [2.0, -1.0, 0.5, 1.5, -4.0, 0.0]
    h.append(0)  # window: 4 0
    assert processed(s, V6, h) == [1.0, -1.0, 0.5, 3.0, -4.0, 0.0]


def test_presence_penalty_counts_generated_tokens_once() -> None:
    s = make(temperature=0.0, presence_penalty=0.5)
    # prompt tokens 0 and 2 are not penalized; generated 3 (twice) and 1 once each
    assert processed(s, V6, history([0, 2], [3, 3, 1])) == [2.0, -1.5, 0.5, 2.5, -2.0, 0.0]


def test_frequency_penalty_scales_with_count() -> None:
    s = make(temperature=0.0, frequency_penalty=0.25)
    assert processed(s, V6, history([0, 2], [3, 3, 1, 3])) == [2.0, -1.25, 0.5, 2.25, -2.0, 0.0]


def test_all_penalties_in_order() -> None:
    s = make(
        temperature=0.0,
        logit_bias={2: 1.5},
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    # bias: 2 → 2.0; repetition over {0,1,2,3}: 1.0 -2.0 1.0 1.5;
    # presence+frequency over generated {3: 2, 1: 1, 2: 1}: 3 → 0.5, 1 → -2.75, 2 → 0.25
    h = history([0, 1], [3, 3, 1, 2])
    assert processed(s, V6, h) == [1.0, -2.75, 0.25, 0.5, -2.0, 0.0]


def test_temperature_scales_before_truncation() -> None:
    s = make(temperature=0.5, presence_penalty=1.0)
    assert processed(s, V6, history([0], [3])) == [4.0, -2.0, 1.0, 4.0, -4.0, 0.0]


# -- truncation supports -----------------------------------------------------------
# probabilities 0.1 0.4 0.2 0.3 in shuffled token order (sorted: 1, 3, 2, 0)
P4 = [0.1, 0.4, 0.2, 0.3]
L4 = [math.log(p) for p in P4]


def support(s: Sampler, logits: list[float]) -> set[int]:
    out = s.process_logits(mx.array(logits), TokenHistory([0])).tolist()
    return {i for i, v in enumerate(out) if v != -INF}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"top_p": 0.35}, {1}),
        ({"top_p": 0.65}, {1, 3}),
        ({"top_p": 0.75}, {1, 3, 2}),
        ({"top_p": 0.95}, {0, 1, 2, 3}),
        ({"min_p": 0.6}, {1, 3}),  # p >= 0.24
        ({"min_p": 0.8}, {1}),  # p >= 0.32
        ({"min_p": 0.4}, {1, 3, 2}),  # p >= 0.16
        ({"top_k": 2}, {1, 3}),
        ({"top_k": 3, "top_p": 0.6}, {1, 3}),
        ({"top_k": 2, "top_p": 0.55}, {1}),  # top-p over the renormalized top 2: 4/7, 3/7
        ({"top_k": 3, "min_p": 0.8}, {1}),
        ({"top_p": 0.95, "min_p": 0.8}, {1}),
        ({"top_p": 0.65, "min_p": 0.4}, {1, 3}),
    ],
)
def test_truncation_keeps_the_expected_support(params: dict, expected: set[int]) -> None:
    s = make(vocab=4, temperature=1.0, **params)
    assert support(s, L4) == expected
    out = s.process_logits(mx.array(L4), TokenHistory([0])).tolist()
    for i in expected:  # kept tokens keep their logits untouched
        assert out[i] == pytest.approx(L4[i], abs=1e-6)
    assert set(draws(s, mx.array(L4), 200)) <= expected
    assert set(draws(make(vocab=4, temperature=1.0, seed=3, **params), mx.array(L4), 300)) == (
        expected
    )


def reference_support(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Top-k, then top-p over the renormalized survivors, then min-p, in plain Python."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k:
        order = order[:top_k]
    weights = [math.exp(logits[i] - logits[order[0]]) for i in order]
    total, before, kept = sum(weights), 0.0, []
    for i, w in zip(order, weights, strict=True):
        if before >= top_p * total:
            break
        if w >= min_p:  # relative to the largest, whose weight is 1
            kept.append(i)
        before += w
    return set(kept)


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(0, 0.5, 0.0), (0, 0.9, 0.0), (10, 0.5, 0.0), (40, 0.8, 0.0), (0, 1.0, 0.2), (30, 0.9, 0.1)],
)
def test_truncation_matches_a_python_reference(top_k: int, top_p: float, min_p: float) -> None:
    rng = random.Random(top_k * 100 + int(top_p * 10))
    logits = [rng.gauss(0.0, 1.5) for _ in range(300)]
    f32 = mx.array(logits).tolist()
    s = make(vocab=300, temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = reference_support(f32, top_k, top_p, min_p)
    assert 1 < len(expected) < 300
    assert support(s, f32) == expected


def test_truncated_draws_follow_the_renormalized_distribution() -> None:
    for params in ({"top_p": 0.65}, {"top_k": 3, "top_p": 0.65}, {"min_p": 0.6}):
        s = make(vocab=4, temperature=1.0, seed=11, **params)
        counts = Counter(draws(s, mx.array(L4), 3000))
        assert set(counts) == {1, 3}
        assert abs(counts[1] / 3000 - 4 / 7) < 0.03, (params, counts)


def test_temperature_one_frequencies_follow_softmax() -> None:
    logits = mx.array([*L4, -40.0])  # a fifth token with no mass, so top-k=4 does cut
    for params in ({}, {"top_p": 0.999}, {"top_k": 4}):  # dense, sorted and top-k paths
        s = make(vocab=5, temperature=1.0, seed=2024, **params)
        counts = Counter(draws(s, logits, 4000))
        assert set(counts) == {0, 1, 2, 3}
        for token, p in enumerate(P4):
            assert abs(counts[token] / 4000 - p) < 0.03, (params, counts)


def test_top_k_renormalizes_over_the_survivors() -> None:
    s = make(vocab=4, temperature=1.0, seed=5, top_k=2)  # 0.4 : 0.3 → 4/7 : 3/7
    counts = Counter(draws(s, mx.array(L4), 2000))
    assert set(counts) == {1, 3}
    assert abs(counts[1] / 2000 - 4 / 7) < 0.04


# -- greedy ---------------------------------------------------------------------------
def test_temperature_zero_is_argmax_and_greedy_fast() -> None:
    s = make(vocab=4096, temperature=0.0)
    assert s.is_greedy_fast and not s.uses_history
    for logits in logit_sequence(10, 4096):
        assert s.sample(logits, TokenHistory([0])).item() == mx.argmax(logits).item()


def test_top_k_one_is_greedy() -> None:
    s = make(vocab=4096, temperature=1.3, top_k=1, seed=1)
    assert not s.is_greedy_fast
    for logits in logit_sequence(10, 4096, seed=1):
        assert s.sample(logits, TokenHistory([0])).item() == mx.argmax(logits).item()


def test_default_temperature_applies_when_unset() -> None:
    assert make(default_temperature=0.0).is_greedy_fast
    assert make(default_temperature=0.7).temperature == 0.7
    assert not make(default_temperature=0.0, temperature=0.9).greedy
    assert make(default_temperature=0.9, temperature=0.0).is_greedy_fast


def test_fast_path_needs_no_bias_and_no_penalties() -> None:
    assert not make(temperature=0.0, logit_bias={1: 1.0}).is_greedy_fast
    assert not make(temperature=0.0, repetition_penalty=1.1).is_greedy_fast
    assert make(temperature=0.0, repetition_penalty=1.1).uses_history
    assert make(temperature=0.0, frequency_penalty=0.2).uses_history
    assert make(temperature=0.0, top_p=0.5, top_k=3, min_p=0.1).is_greedy_fast


def test_banning_the_greedy_token_changes_the_choice() -> None:
    logits = mx.array(V6)
    assert make(temperature=0.0).sample(logits, TokenHistory([0])).item() == 3
    banned = make(temperature=0.0, logit_bias={3: -INF})
    assert banned.sample(logits, TokenHistory([0])).item() == 0
    sampled = make(temperature=5.0, seed=0, logit_bias={3: -INF, 0: -INF})
    assert 3 not in draws(sampled, logits, 300) and 0 not in draws(sampled, logits, 300)


def test_banning_everything_falls_back_to_the_raw_argmax() -> None:
    ban_all = {t: -INF for t in range(6)}
    logits = mx.array(V6)
    for params in ({"temperature": 0.0}, {"temperature": 1.0}, {"top_p": 0.5}, {"top_k": 2}):
        s = make(seed=0, logit_bias=ban_all, **params)
        assert draws(s, logits, 5) == [3] * 5
        assert not any(math.isnan(v) for v in s.process_logits(logits, TokenHistory([0])).tolist())


def test_a_positive_infinite_bias_forces_the_token() -> None:
    s = make(temperature=1.0, logit_bias={4: INF, 2: INF, 3: -INF})
    assert draws(s, mx.array(V6), 5) == [2] * 5


def test_out_of_vocabulary_bias_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make(vocab=6, logit_bias={6: 1.0})


# -- seeds and batches -----------------------------------------------------------
def run(sampler: Sampler, seq: list[mx.array], prompt: list[int]) -> list[int]:
    h = TokenHistory(prompt)
    out = []
    for logits in seq:
        token = sampler.sample(logits, h).item()
        h.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("params", [{}, {"top_p": 0.9}, {"top_k": 50, "min_p": 0.05}])
def test_same_seed_same_tokens_other_seed_differs(params: dict) -> None:
    seq = logit_sequence(50, 1000)
    a = run(make(vocab=1000, temperature=1.0, seed=42, **params), seq, [1, 2])
    b = run(make(vocab=1000, temperature=1.0, seed=42, **params), seq, [1, 2])
    c = run(make(vocab=1000, temperature=1.0, seed=43, **params), seq, [1, 2])
    assert a == b
    assert a != c
    assert len(set(a)) > 10  # it really samples


def test_unseeded_samplers_differ() -> None:
    seq = logit_sequence(30, 1000)
    a = run(make(vocab=1000, temperature=1.0), seq, [1])
    b = run(make(vocab=1000, temperature=1.0), seq, [1])
    assert a != b


BATCH_PARAMS: list[dict] = [
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    {"temperature": 1.0, "seed": 2, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
    {"temperature": 0.0},
    {"temperature": 0.0, "presence_penalty": 1.0},
    {"temperature": 1.2, "top_k": 20, "seed": 3, "logit_bias": {7: -INF}},
]


def test_a_row_in_a_batch_samples_as_it_would_alone() -> None:
    vocab, steps = 512, 20
    rows = len(BATCH_PARAMS)
    per_row = [logit_sequence(steps, vocab, seed=r) for r in range(rows)]
    seq = [mx.stack([row[t] for row in per_row]) for t in range(steps)]  # (B, V) per step
    samplers = [make(vocab=vocab, **p) for p in BATCH_PARAMS]
    hists = [TokenHistory([r, r + 1]) for r in range(rows)]
    together: list[list[int]] = [[] for _ in range(rows)]
    for logits in seq:
        tokens = sample_batch(samplers, logits, hists)
        assert tokens.dtype == mx.int32 and tokens.shape == (rows,)
        for r, t in enumerate(tokens.tolist()):
            hists[r].append(t)
            together[r].append(t)
    for r, p in enumerate(BATCH_PARAMS):
        alone, h = make(vocab=vocab, **p), TokenHistory([r, r + 1])
        solo = []
        for logits in seq:
            t = sample_batch([alone], logits[r : r + 1], [h]).item()
            h.append(t)
            solo.append(t)
        assert solo == together[r], p


def test_sample_batch_checks_lengths() -> None:
    with pytest.raises(ValueError):
        sample_batch([make()], mx.zeros((2, 6)), [TokenHistory([0])])


# -- history ------------------------------------------------------------------------
def test_history_counts_match_a_recount() -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(20) for _ in range(30)]
    h = TokenHistory(prompt)
    windows = {size: h.window(size) for size in (1, 5, 40, None)}
    generated: list[int] = []
    for _ in range(60):
        token = rng.randrange(20)
        h.append(token)
        generated.append(token)
        everything = prompt + generated
        for size, counts in windows.items():
            recent = everything if size is None else everything[-size:]
            assert counts.counts == Counter(recent)
            assert sorted(counts.ids().tolist()) == sorted(set(recent))
        assert h.generated_counts == Counter(generated)
    late = h.window(7)  # set up after tokens were appended
    assert late.counts == Counter((prompt + generated)[-7:])
    assert len(h) == 90 and h.prompt_length == 30


def test_sort_keys_order_values_descending_with_ties_by_id() -> None:
    from ffai_worker.engine.sampling import _descending_keys, _unpack

    rng = random.Random(1)
    special = [0.0, -0.0, INF, -INF, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, 1.0, -1.0, -1.0]
    values = special + [rng.uniform(-50, 50) for _ in range(200)] + [2.5] * 5
    rng.shuffle(values)
    arr = mx.array(values)
    got_values, got_ids = _unpack(mx.sort(_descending_keys(arr)))
    f32 = arr.tolist()  # rounded to float32, as the sampler sees them
    # descending, +0.0 before -0.0, equal values by lower id
    expected = sorted(range(len(f32)), key=lambda i: (-f32[i], math.copysign(1, f32[i]) < 0, i))
    assert got_ids.tolist() == expected
    assert got_values.tolist() == [f32[i] for i in expected]
