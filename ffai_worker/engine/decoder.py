"""The batched decode step: one token for every KV slot, as one compiled MLX function.

Why compiled: on the CPU backend a small model's decode is dominated by the
per-op dispatch cost, not arithmetic. `mx.compile` fuses the elementwise ops
(norms, SiLU gate, residuals, mask) into JIT-built kernels, cached on disk
(figures: benchmarks/NOTES.md).

Why attention spans the longest row rounded up (to 32 positions, or 1/16 of
the width for long rows): attention is the part of a batched CPU decode that
grows with batch size and length, so it must not cover the whole allocated
cache; rounding keeps one trace valid for many steps (a new width costs a
retrace; its kernels come from the on-disk cache), and the
geometric granularity bounds the traces kept to about a hundred for a 32k
context. The mask hides each row's positions past its own length.

Where the native kernels run every layer's attention (`models.base.decode_attention`,
Linux CPU), each row reads exactly its own positions: the width plays no part, and one
trace (width 0) serves every length, with no retrace as rows grow.

`FFAI_COMPILE=0` runs the same function eagerly (for debugging, or a machine
whose MLX cannot build CPU kernels; that is also detected at the first step).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx

from ffai_worker.engine.kv_cache import SlotCache
from ffai_worker.models.base import Columns
from ffai_worker.models.cpu_ops import cpu_decode_step
from ffai_worker.native.quant import native_ops

log = logging.getLogger("ffai_worker")

MIN_WIDTH_STEP = 32  # attention width granularity for short rows, in positions
MAX_TRACES = 128  # compiled widths kept (each a small traced graph; weights are shared)


def attention_width(longest: int, capacity: int) -> int:
    """`longest` positions rounded up to 32, or to 1/16 of their power of two when longer."""
    step = max(MIN_WIDTH_STEP, 1 << max(0, longest.bit_length() - 5))
    return min(capacity, -(-longest // step) * step)


class _StepView:
    """One layer's cache inside the traced step: a pure function of its arrays."""

    def __init__(
        self, keys: mx.array, values: mx.array, offset: mx.array, index: mx.array, width: int
    ) -> None:
        self.keys, self.values = keys, values  # (S, n_kv, T, D)
        self.offset = offset  # (S,) per-row rope offsets
        self.index = index  # (S, n_kv, 1, D) write positions
        self.width = width  # positions attended
        self.fused = False  # attention ran on the native kernels (fused_attention)

    @property
    def fused_ready(self) -> bool:
        """`fused_attention` can run: the native kernel is loaded and the cache is float32."""
        return native_ops() is not None and self.keys.dtype == mx.float32

    def fused_attention(
        self, q: Columns, k: Columns, v: Columns, *, rope: dict[str, Any], **attend: Any
    ) -> mx.array:
        """RoPE, KV write and attention as three native nodes (`models.base.decode_attention`).

        q, k and v are (array, first column, width): the kernels read them in place.
        Each row attends exactly its own positions, so the step's width does not matter
        here; the old buffers are donated, as in `update_and_fetch`.
        """
        ext = native_ops()
        assert ext is not None, "fused_attention without fused_ready"
        self.fused = True
        positions = self.offset
        self.keys = ext.kv_write(self.keys, k[0], positions, **rope, column=k[1])
        self.values = ext.kv_write(self.values, v[0], positions, column=v[1])
        heads = q[2] // self.keys.shape[3]
        out: mx.array = ext.decode_attention(
            q[0], self.keys, self.values, positions, **rope, **attend, column=q[1], heads=heads
        )
        return out

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys/values: (S, n_kv, 1, D); the old buffers are donated, so this writes in place.
        self.keys = mx.put_along_axis(self.keys, self.index, keys, axis=2)
        self.values = mx.put_along_axis(self.values, self.index, values, axis=2)
        w = self.width
        return self.keys[:, :, :w, :], self.values[:, :, :w, :]  # (S, n_kv, W, D)


class BatchedDecoder:
    """Runs `model` for one new token in every slot of `cache`."""

    def __init__(self, model: Any, cache: SlotCache, *, compiled: bool | None = None) -> None:
        self.model = model
        self.cache = cache
        if compiled is None:
            compiled = os.environ.get("FFAI_COMPILE", "1") != "0"
        self.compiled = compiled
        self._local = threading.local()  # `.traces`: the calling thread's compiled widths
        self._checked = not compiled  # the first compiled step proves the JIT works here
        self.fused_layers = 0  # layers whose attention ran natively (decode_attention)

    def _step(
        self,
        width: int,
        inputs: mx.array,
        positions: mx.array,
        keys: list[mx.array],
        values: list[mx.array],
    ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        slots, n_kv, _, head_dim = keys[0].shape
        visible = mx.arange(width, dtype=mx.int32)[None, :] <= positions[:, None]  # (S, W)
        mask = mx.where(visible, 0.0, float("-inf")).astype(keys[0].dtype)[:, None, None, :]
        index = mx.broadcast_to(positions[:, None, None, None], (slots, n_kv, 1, head_dim))
        views = [
            _StepView(k, v, positions, index, width) for k, v in zip(keys, values, strict=True)
        ]
        with cpu_decode_step():  # RoPE tables once per step; exp without libm calls
            logits = self.model(inputs, cache=views, mask=mask)[:, -1, :]  # (S, V)
        self.fused_layers = sum(view.fused for view in views)  # as last traced
        return logits, [v.keys for v in views], [v.values for v in views]

    def __call__(self, inputs: mx.array, decoding: list[bool]) -> mx.array:
        """Logits (n, V) for the n occupied slots, from their input tokens (n, 1).

        Builds the step lazily and swaps in the updated cache buffers; the
        caller evaluates (or async-evaluates) the result.
        """
        cache = self.cache
        n = cache.active
        write_at = cache.advance(decoding)
        width = self._width(max(write_at) + 1, cache.capacity)
        positions = mx.array(write_at, dtype=mx.int32)  # (S,)
        slots = len(write_at)
        if slots > n:
            inputs = mx.pad(inputs, [(0, slots - n), (0, 0)])  # (S, 1)
        logits, cache.keys, cache.values = self._run(width, inputs, positions)
        return logits[:n] if slots > n else logits  # (n, V)

    def _width(self, longest: int, capacity: int) -> int:
        """The attention width of the step, or 0 where every layer attends natively: each
        row then reads exactly its own positions, so one trace serves every length."""
        layers = getattr(self.model, "num_layers", -1)
        if self.fused_layers == layers and native_ops() is not None:
            return 0
        return attention_width(longest, capacity)

    @property
    def _traces(self) -> OrderedDict[int, Callable[..., Any]]:
        """The calling thread's traces (width -> step), kept in a thread-local.

        MLX caches compiled graphs per thread by the function's address, and a dropped
        function erases only its last calling thread's entry: a trace run on two threads
        left its graph (old width, old weights) for the next function at that address.
        Thread-local traces run on one thread, and die on it when it ends, while its MLX
        cache exists (else that cache, weights and all, lingered past `join()`).
        """
        traces: OrderedDict[int, Callable[..., Any]] | None = getattr(self._local, "traces", None)
        if traces is None:
            traces = self._local.traces = OrderedDict()
        return traces

    def _trace(self, width: int) -> Callable[..., Any]:
        traces = self._traces
        fn = traces.get(width)
        if fn is None:
            step = partial(self._step, width)
            fn = mx.compile(step) if self.compiled else step
            traces[width] = fn
            if len(traces) > MAX_TRACES:
                traces.popitem(last=False)
        else:
            traces.move_to_end(width)
        return fn

    def _run(self, width: int, inputs: mx.array, positions: mx.array) -> tuple[Any, Any, Any]:
        cache = self.cache
        if self._checked:
            return self._trace(width)(inputs, positions, cache.keys, cache.values)
        try:
            out = self._trace(width)(inputs, positions, cache.keys, cache.values)
            mx.eval(out)
        except Exception as exc:  # no C++ compiler for CPU kernels, for instance
            log.warning("compiled decode failed (%s); decoding eagerly", exc)
            self.compiled = False
            self._local = threading.local()  # every thread's compiled traces
            out = self._trace(width)(inputs, positions, cache.keys, cache.values)
        self._checked = True
        return out
