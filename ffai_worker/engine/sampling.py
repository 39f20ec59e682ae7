"""Per-sequence sampling: logit processing and the draw, built lazily for batched evaluation.

One `Sampler` per sequence turns that sequence's row of logits into a token.
Processing order (each step is skipped when its parameter is neutral):

1. logit bias: `logits[t] += bias[t]`
2. repetition penalty (HF semantics): for every token in the repetition
   window, `l / penalty` if `l > 0` else `l * penalty`
3. presence penalty (OpenAI semantics): `l -= presence_penalty` once for each
   distinct generated token
4. frequency penalty: `l -= frequency_penalty * count` for each generated token
5. temperature: `l / T`; `T == 0` is greedy (argmax of the logits after 1-4;
   top-k, top-p and min-p are then irrelevant)
6. top-k: keep the k largest (`0` or `k >= V` disables)
7. top-p: sort descending, keep a token while the mass strictly before it is
   below `top_p` (so the smallest prefix whose mass reaches `top_p`)
8. min-p: keep tokens whose probability is at least `min_p` times the largest
9. draw from the categorical distribution over what is left with this
   sequence's own RNG key (Gumbel-max via `mx.random.categorical`, or an
   inverse-CDF draw when top-p has sorted the candidates already).

Which history the penalties see (vLLM's rule):
- repetition penalty: prompt + generated tokens; with
  `repetition_context_size = n` only the last n of them (prompt tokens count
  while they are among the last n), `None` = the whole history;
- presence and frequency penalties: generated tokens only, never the prompt.

Infinite biases: a `-inf` bias makes a token impossible on every path. A
`+inf` bias forces the token: the sampler returns it every step without
looking at the logits (the lowest id if several are forced). If `-inf` biases
leave no token possible, the step falls back to the argmax of the model's raw
logits instead of producing NaN or an arbitrary id; `process_logits` then
returns all `-inf`.

Determinism: a seeded sampler owns an `mx.random` key split once per drawn
token, and every row is processed on its own, so a sequence gets the same
tokens for the same seed and logits whatever else runs in the batch.

Cost (V = vocabulary): the penalties are sparse (gather/scatter over the
distinct tokens involved; `TokenHistory` keeps the counts incrementally).
Top-k partitions packed (value, id) integer keys (O(V)) and sorts only the k
survivors; top-p without top-k needs a full sort of V, by far the most
expensive step on CPU, so a top-k bound makes top-p cheap. Equal logits are
ordered by lower token id. Logits are processed in float32 (other dtypes are
cast). Logits wider than `vocab_size` (padded embedding rows) are not masked:
greedy stays the argmax of the model's logits, matching the transformers
oracle; `vocab_size` only bounds the logit-bias ids.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import mlx.core as mx

from ffai_client.types import GenerationParameters
from ffai_worker.models.cpu_ops import argmax

DEFAULT_TEMPERATURE = 0.6
_NEG_INF = -math.inf
_unseeded = itertools.count()


class TokenCounts:
    """Token → count, with the MLX arrays the penalties need cached until it changes."""

    __slots__ = ("_ids", "_values", "counts")

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.counts: dict[int, int] = {}
        self._ids: mx.array | None = None
        self._values: mx.array | None = None
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        count = self.counts.get(token, 0)
        self.counts[token] = count + 1
        if count == 0:
            self._ids = None  # membership (and so the order) changed
        self._values = None

    def remove(self, token: int) -> None:
        count = self.counts[token] - 1
        if count:
            self.counts[token] = count
        else:
            del self.counts[token]
            self._ids = None
        self._values = None

    def ids(self) -> mx.array:
        """The distinct tokens, int32 (n,), in the same order as `values()`."""
        if self._ids is None:
            self._ids = mx.array(list(self.counts), dtype=mx.int32)
        return self._ids

    def values(self) -> mx.array:
        """The counts, float32 (n,)."""
        if self._values is None:
            self._values = mx.array(list(self.counts.values()), dtype=mx.float32)
        return self._values


class TokenHistory:
    """The prompt and generated tokens of one sequence, with incremental counts.

    The engine builds it from the prompt ids and calls `append` once per
    generated token. Counts over generated tokens are always kept; a count
    over the last n tokens (or all of them) is set up the first time a sampler
    asks for that window and then slides with each `append`, so a step costs
    O(windows) in Python plus O(distinct tokens) to hand the ids to MLX.
    """

    def __init__(self, prompt_ids: Iterable[int]) -> None:
        self.tokens: list[int] = [int(t) for t in prompt_ids]
        self.prompt_length = len(self.tokens)
        self.generated = TokenCounts()
        self._windows: dict[int | None, TokenCounts] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        token = int(token)
        self.tokens.append(token)
        self.generated.add(token)
        for size, counts in self._windows.items():
            counts.add(token)
            if size is not None and len(self.tokens) > size:
                counts.remove(self.tokens[-size - 1])

    @property
    def generated_counts(self) -> Mapping[int, int]:
        return self.generated.counts

    def window(self, size: int | None) -> TokenCounts:
        """Counts over the last `size` tokens of prompt + generated (`None`: all of them)."""
        counts = self._windows.get(size)
        if counts is None:
            recent = self.tokens if size is None else self.tokens[-size:]
            counts = self._windows[size] = TokenCounts(recent)
        return counts


class Sampler:
    """Turns one sequence's logits into tokens; see the module docstring for the rules."""

    def __init__(
        self,
        params: GenerationParameters,
        *,
        vocab_size: int,
        default_temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        temperature = params.temperature
        if temperature is None:
            temperature = default_temperature
        self.temperature = max(float(temperature), 0.0)
        self.greedy = self.temperature == 0.0
        self.vocab_size = vocab_size
        self.top_k = params.top_k
        self.top_p = params.top_p
        self.min_p = params.min_p
        self.repetition_penalty = params.repetition_penalty
        self.repetition_context_size = params.repetition_context_size
        self.presence_penalty = params.presence_penalty
        self.frequency_penalty = params.frequency_penalty
        self.logprobs = params.logprobs  # alternatives to report per token; None: no logprobs
        self.uses_history = (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
        params.check_vocabulary(vocab_size)
        self._bias_ids, self._bias_values, self._forced, self._has_ban = _split_bias(
            params.logit_bias
        )
        self.has_no_bias = self._bias_ids is None
        # Batchable: the engine may argmax all such rows in one op.
        self.is_greedy_fast = self.greedy and not self.uses_history and not params.logit_bias
        seed = params.seed
        if seed is None:
            seed = (int.from_bytes(os.urandom(8), "little") + next(_unseeded)) % 2**64
        self.seed = seed
        self._key = mx.random.key(seed)

    def _next_key(self) -> mx.array:
        keys = mx.random.split(self._key)  # (2, 2)
        self._key = keys[0]
        return keys[1]

    # -- processing ------------------------------------------------------------
    def penalized(self, logits: mx.array, history: TokenHistory) -> mx.array:
        """Steps 1-4 (bias and penalties) on one row of logits (V,) → float32 (V,)."""
        x = logits if logits.dtype == mx.float32 else logits.astype(mx.float32)
        if self._bias_ids is not None:
            assert self._bias_values is not None
            x = x.at[self._bias_ids].add(self._bias_values)
        if self.repetition_penalty != 1.0:
            window = history.window(self.repetition_context_size)
            if window.counts:
                ids = window.ids()
                picked = x[ids]
                penalty = self.repetition_penalty
                picked = mx.where(picked > 0, picked / penalty, picked * penalty)
                x = mx.put_along_axis(x, ids, picked, axis=0)
        if (self.presence_penalty or self.frequency_penalty) and history.generated.counts:
            gen = history.generated
            delta: mx.array | float = self.presence_penalty
            if self.frequency_penalty:
                delta = self.presence_penalty + self.frequency_penalty * gen.values()
            x = x.at[gen.ids()].subtract(delta)
        return x

    def _scaled(self, x: mx.array) -> mx.array:
        return x if self.temperature == 1.0 else x / self.temperature

    def _candidates(self, s: mx.array) -> tuple[mx.array, mx.array | None, bool]:
        """Top-k, then the descending order top-p needs: (values, ids or None, sorted)."""
        vocab = s.shape[-1]
        if 0 < self.top_k < vocab:
            keys = mx.partition(_descending_keys(s), self.top_k - 1)[: self.top_k]  # (k,)
            if self.top_p < 1.0:
                keys = mx.sort(keys)  # sorting k survivors is cheap
            return (*_unpack(keys), self.top_p < 1.0)
        if self.top_p < 1.0:
            return (*_unpack(mx.sort(_descending_keys(s))), True)  # (V,): the costly case
        return s, None, False

    def _sorted_mass(self, values: mx.array) -> tuple[mx.array, mx.array]:
        """For values sorted descending: (inclusive cdf of unnormalized probs, kept prefix)."""
        rel = values - values[0]
        probs = mx.exp(rel)  # -inf → 0
        before = mx.cumsum(probs, inclusive=False)
        cdf = before + probs
        # cdf[-1] (not probs.sum()) so that zero-mass (banned) tokens are never kept.
        keep = before < self.top_p * cdf[-1]
        if self.min_p > 0.0:
            keep = keep & (rel >= math.log(self.min_p))  # p_i >= min_p * p_max
        return cdf, keep

    def _truncated(self, values: mx.array, ordered: bool) -> mx.array:
        """Top-p and min-p: `values` with the removed tokens set to -inf."""
        if ordered:
            return mx.where(self._sorted_mass(values)[1], values, _NEG_INF)
        if self.min_p > 0.0:
            return mx.where(values - values.max() >= math.log(self.min_p), values, _NEG_INF)
        return values

    def _draw(self, x: mx.array) -> mx.array:
        """Temperature, truncation and one categorical draw with this sequence's key."""
        values, ids, ordered = self._candidates(self._scaled(x))
        key = self._next_key()
        if not ordered:
            index = mx.random.categorical(self._truncated(values, False), key=key)
            return index if ids is None else ids[index]
        # Sorted already: inverse CDF over the kept prefix beats Gumbel noise over V.
        cdf, keep = self._sorted_mass(values)
        last = mx.maximum(keep.sum() - 1, 0)
        target = mx.random.uniform(key=key) * cdf[last]
        index = mx.minimum((cdf <= target).sum(), last)
        assert ids is not None
        return ids[index]

    def process_logits(self, logits: mx.array, history: TokenHistory) -> mx.array:
        """Every step before the draw, dense (V,): the draw is a softmax sample of this.

        Greedy samplers stop after the penalties (no temperature or truncation).
        Removed tokens are -inf; all are -inf if the logit bias bans everything.
        """
        x = self.penalized(logits, history)
        if self.greedy:
            return x
        values, ids, ordered = self._candidates(self._scaled(x))
        values = self._truncated(values, ordered)
        if ids is None:
            return values
        dense = mx.full(x.shape, _NEG_INF, dtype=mx.float32)
        return mx.put_along_axis(dense, ids, values, axis=0)

    # -- the draw --------------------------------------------------------------
    def sample(self, logits: mx.array, history: TokenHistory) -> mx.array:
        """One token from one row of logits (V,): a lazy int32 scalar."""
        if self._forced is not None:
            return mx.array(self._forced, dtype=mx.int32)
        if self.is_greedy_fast:
            return argmax(logits)
        x = self.penalized(logits, history)
        token = mx.argmax(x) if self.greedy else self._draw(x)
        if self._has_ban:
            # Everything banned: fall back to the raw argmax rather than an arbitrary id.
            token = mx.where(x.max() > _NEG_INF, token, mx.argmax(logits))
        return token.astype(mx.int32)


def _descending_keys(s: mx.array) -> mx.array:
    """uint64 keys whose ascending order is `s` descending, ties by lower id: (V,) → (V,).

    The float's bits, mapped to an order-reversing uint32, above the token id:
    sorting these integers is about twice as fast as `argsort` on CPU, and the
    values and ids come back out of the keys without a gather over V.
    """
    bits = s.view(mx.uint32)
    order = bits ^ (((bits >> 31) ^ 1) * 0x7FFFFFFF)  # flips only the low 31 bits
    return (order.astype(mx.uint64) << 32) | _token_ids(s.shape[-1])


def _unpack(keys: mx.array) -> tuple[mx.array, mx.array]:
    """Inverse of `_descending_keys`: (values float32, ids int32)."""
    order = (keys >> 32).astype(mx.uint32)
    bits = order ^ (((order >> 31) ^ 1) * 0x7FFFFFFF)  # the map is its own inverse
    return bits.view(mx.float32), (keys & 0xFFFFFFFF).astype(mx.int32)


_ARANGES: dict[int, mx.array] = {}


def _token_ids(vocab: int) -> mx.array:
    ids = _ARANGES.get(vocab)
    if ids is None:
        ids = _ARANGES[vocab] = mx.arange(vocab, dtype=mx.uint64)
    return ids


def _split_bias(
    bias: Mapping[int, float],
) -> tuple[mx.array | None, mx.array | None, int | None, bool]:
    """(ids, values) of the additive biases, the forced (+inf) token, whether any ban (-inf)."""
    forced = [t for t, b in bias.items() if b == math.inf]
    additive = {t: b for t, b in bias.items() if b != math.inf}
    if not additive:
        return None, None, min(forced, default=None), False
    ids = mx.array(list(additive), dtype=mx.int32)
    values = mx.array(list(additive.values()), dtype=mx.float32)
    has_ban = any(b == _NEG_INF for b in additive.values())
    return ids, values, min(forced, default=None), has_ban


def sample_batch(
    samplers: Sequence[Sampler], logits: mx.array, histories: Sequence[TokenHistory]
) -> mx.array:
    """One token per row of logits (B, V) → lazy int32 (B,).

    Greedy-fast rows are argmaxed together in one op; every other row is
    sampled on its own, so a row's token never depends on the other rows.
    """
    rows = logits.shape[0]
    if not len(samplers) == len(histories) == rows:
        raise ValueError(
            f"{len(samplers)} samplers and {len(histories)} histories for {rows} rows of logits"
        )
    fast = [i for i, s in enumerate(samplers) if s.is_greedy_fast]
    if len(fast) == rows:
        return argmax(logits)
    greedy: mx.array | None = None
    if fast:
        greedy = argmax(logits[mx.array(fast, dtype=mx.int32)])  # (len(fast),)
    slot = {row: j for j, row in enumerate(fast)}
    tokens = []
    for i, (sampler, history) in enumerate(zip(samplers, histories, strict=True)):
        if i in slot:
            assert greedy is not None
            tokens.append(greedy[slot[i]])
        else:
            tokens.append(sampler.sample(logits[i], history))
    return mx.stack(tokens)
