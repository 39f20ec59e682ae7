"""One step's draw: the sampled tokens and, for rows that asked, their log-probabilities.

Log-probabilities come from the distribution the token was drawn from, at the
point SPEC 6.6 names: the model's logits after the grammar mask, logit bias
and penalties (sampling.py steps 1-4), before temperature, top-k/p and min-p.
So they do not depend on the sampling settings that only reshape the draw,
and greedy and sampled requests report the same numbers for the same logits.

They cost nothing unless requested: rows without `logprobs` add no work, and a
requesting row adds one log-softmax over its vocabulary and a top-n partition,
built lazily and evaluated with the tokens (one readback per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from ffai_worker.engine.sampling import Sampler, TokenHistory, sample_batch
from ffai_worker.engine.sequence import RawLogprob


@dataclass
class Draw:
    """Lazy results of one draw over B rows; `read` brings them back to Python."""

    tokens: mx.array  # (B,) int32
    rows: list[int] = field(default_factory=list)  # rows that asked for logprobs
    counts: list[int] = field(default_factory=list)  # alternatives each of those asked for
    chosen: mx.array | None = None  # (R,) the drawn tokens' logprobs
    top_ids: mx.array | None = None  # (R, n) most likely first
    top_values: mx.array | None = None  # (R, n)

    def arrays(self) -> list[mx.array]:
        """What to evaluate (with the cache) for this draw."""
        extra = [a for a in (self.chosen, self.top_ids, self.top_values) if a is not None]
        return [self.tokens, *extra]

    def read(self) -> tuple[list[int], list[RawLogprob | None]]:
        """Token ids per row and, per row, its (logprob, [(id, logprob)…]) or None."""
        tokens = cast(list[int], self.tokens.tolist())
        out: list[RawLogprob | None] = [None] * len(tokens)
        if self.chosen is None:
            return tokens, out
        chosen = cast(list[float], self.chosen.tolist())
        ids: list[list[int]] = self.top_ids.tolist() if self.top_ids is not None else []
        values: list[list[float]] = self.top_values.tolist() if self.top_values is not None else []
        for j, (row, n) in enumerate(zip(self.rows, self.counts, strict=True)):
            # Alternatives the mask (or a ban) made impossible are not alternatives.
            pairs = zip(ids[j][:n], values[j][:n], strict=True) if n else ()
            top = [(t, v) for t, v in pairs if v > float("-inf")]
            out[row] = (chosen[j], top)
        return tokens, out


def draw(
    samplers: Sequence[Sampler],
    logits: mx.array,
    histories: Sequence[TokenHistory],
    allowed: mx.array | None = None,
) -> Draw:
    """Sample every row of logits (B, V), masked by `allowed` (B, V) where given."""
    if allowed is not None:
        logits = mx.where(allowed, logits, float("-inf"))
    tokens = sample_batch(samplers, logits, histories)
    rows = [i for i, s in enumerate(samplers) if s.logprobs is not None]
    if not rows:
        return Draw(tokens)
    counts = [int(samplers[i].logprobs or 0) for i in rows]
    n = max(counts)
    x = _processed(samplers, logits, histories, rows)  # (R, V) float32
    # Only gathered entries are normalized: no (R, V) log-softmax is ever written.
    lse = mx.logsumexp(x, axis=-1, keepdims=True)  # (R, 1)
    picked = tokens if len(rows) == len(samplers) else tokens[mx.array(rows)]
    chosen = mx.take_along_axis(x, picked[:, None], axis=-1) - lse
    result = Draw(tokens, rows, counts, chosen[:, 0])
    width = x.shape[-1]
    n = min(n, width)
    if n:
        ids = mx.argpartition(x, width - n, axis=-1)[:, width - n :]  # (R, n), unordered
        vals = mx.take_along_axis(x, ids, axis=-1) - lse
        order = mx.argsort(-vals, axis=-1)
        result.top_ids = mx.take_along_axis(ids, order, axis=-1)
        result.top_values = mx.take_along_axis(vals, order, axis=-1)
    return result


def _processed(
    samplers: Sequence[Sampler],
    logits: mx.array,
    histories: Sequence[TokenHistory],
    rows: list[int],
) -> mx.array:
    """The rows' logits after bias and penalties (R, V) float32, batched when none has any."""
    if all(_plain(samplers[i]) for i in rows):
        x = logits if len(rows) == logits.shape[0] else logits[mx.array(rows)]
        return x.astype(mx.float32)
    return mx.stack([samplers[i].penalized(logits[i], histories[i]) for i in rows])


def _plain(sampler: Sampler) -> bool:
    # penalized() is the identity (up to the float32 cast) for such a sampler.
    return not sampler.uses_history and sampler.has_no_bias
