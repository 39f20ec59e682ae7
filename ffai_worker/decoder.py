"""The batched decode step: one token for every KV slot, as one compiled MLX function.

Why compiled: on the CPU backend a small model's decode is dominated by the
per-op dispatch cost, not arithmetic. `mx.compile` fuses the elementwise ops
(norms, SiLU gate, residuals, mask) into JIT-built kernels. Measured on
tinystories-260k, 2-core x86 CPU, one sequence: eager 725 tok/s, compiled
1190 tok/s (kernels are cached on disk, so only a worker's first-ever step per
slot count pays the ~2 s build).

Why attention spans the whole allocated capacity rather than the longest row:
a shape that changes only when the cache grows (every `SlotCache.step`
positions) or gains slots keeps one trace valid for hundreds of steps; the
mask hides each row's positions past its own length, at the price of at most
`step` masked positions of attention work.

`FFAI_COMPILE=0` runs the same function eagerly (for debugging, or a machine
whose MLX cannot build CPU kernels; that is also detected at the first step).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import mlx.core as mx

from ffai_worker.kv_cache import SlotCache

log = logging.getLogger("ffai_worker")


class _StepView:
    """One layer's cache inside the traced step: a pure function of its arrays."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, index: mx.array):
        self.keys, self.values = keys, values  # (S, n_kv, T, D)
        self.offset = offset  # (S,) per-row rope offsets
        self.index = index  # (S, n_kv, 1, D) write positions

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys/values: (S, n_kv, 1, D); the old buffers are donated, so this writes in place.
        self.keys = mx.put_along_axis(self.keys, self.index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, self.index, values, axis=2)
        return self.keys, self.values


class BatchedDecoder:
    """Runs `model` for one new token in every slot of `cache`."""

    def __init__(self, model: Any, cache: SlotCache, *, compiled: bool | None = None) -> None:
        self.model = model
        self.cache = cache
        if compiled is None:
            compiled = os.environ.get("FFAI_COMPILE", "1") != "0"
        self.compiled = compiled
        self._fn = mx.compile(self._step) if compiled else self._step
        self._checked = not compiled  # the first compiled step proves the JIT works here

    def _step(
        self, inputs: mx.array, positions: mx.array, keys: list[mx.array], values: list[mx.array]
    ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        slots, n_kv, capacity, head_dim = keys[0].shape
        visible = mx.arange(capacity, dtype=mx.int32)[None, :] <= positions[:, None]  # (S, T)
        mask = mx.where(visible, 0.0, float("-inf")).astype(keys[0].dtype)[:, None, None, :]
        index = mx.broadcast_to(positions[:, None, None, None], (slots, n_kv, 1, head_dim))
        views = [_StepView(k, v, positions, index) for k, v in zip(keys, values, strict=True)]
        logits = self.model(inputs, cache=views, mask=mask)[:, -1, :]  # (S, V)
        return logits, [v.keys for v in views], [v.values for v in views]

    def __call__(self, inputs: mx.array, decoding: list[bool]) -> mx.array:
        """Logits (n, V) for the n occupied slots, from their input tokens (n, 1).

        Builds the step lazily and swaps in the updated cache buffers; the
        caller evaluates (or async-evaluates) the result.
        """
        cache = self.cache
        n = cache.active
        positions = mx.array(cache.advance(decoding), dtype=mx.int32)  # (S,)
        slots = positions.shape[0]
        if slots > n:
            inputs = mx.pad(inputs, [(0, slots - n), (0, 0)])  # (S, 1)
        logits, cache.keys, cache.values = self._run(inputs, positions)
        return logits[:n] if slots > n else logits  # (n, V)

    def _run(self, inputs: mx.array, positions: mx.array) -> tuple[Any, Any, Any]:
        cache = self.cache
        if self._checked:
            return self._fn(inputs, positions, cache.keys, cache.values)
        try:
            out = self._fn(inputs, positions, cache.keys, cache.values)
            mx.eval(out)
        except Exception as exc:  # no C++ compiler for CPU kernels, for instance
            log.warning("compiled decode failed (%s); decoding eagerly", exc)
            self._fn, self.compiled = self._step, False
            out = self._fn(inputs, positions, cache.keys, cache.values)
        self._checked = True
        return out
