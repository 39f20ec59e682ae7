"""RoPE inside `shared_rope_tables` (the decode step's path) equals mx.fast.rope to the bit."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest

from ffai_worker.models.base import RoPE, shared_rope_tables

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(16)],
    "long_factor": [1.0 + 0.2 * i for i in range(16)],
    "original_max_position_embeddings": 4096,
}
CASES = [
    (64, 1e6, None, 64),
    (64, 1e4, {"rope_type": "linear", "factor": 4.0}, 64),
    (64, 5e5, LLAMA3, 64),
    (32, 1e4, LONGROPE, 32),
    (16, 1e4, None, 64),  # partial rotary: stays on mx.fast.rope
]


def _reference(rope: RoPE, x: mx.array, offset: mx.array) -> mx.array:
    return mx.fast.rope(
        x * rope._mscale,
        rope.dims,
        traditional=False,
        base=rope._base,
        scale=rope._scale,
        offset=offset,
        freqs=rope._freqs,
    )


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize(("dims", "base", "scaling", "head_dim"), CASES)
def test_shared_tables_equal_fast_rope(
    dims: int, base: float, scaling: Any, head_dim: int, length: int, compiled: bool
) -> None:
    rope = RoPE(dims, base, scaling, max_position_embeddings=131072)
    other = RoPE(dims, base, scaling, max_position_embeddings=131072)  # another layer's
    q = mx.random.normal((3, 6, length, head_dim), key=mx.random.key(1))
    k = mx.random.normal((3, 2, length, head_dim), key=mx.random.key(2))
    offset = mx.array([0, 77, 30000], dtype=mx.int32)

    def step(q: mx.array, k: mx.array, offset: mx.array) -> tuple[mx.array, mx.array]:
        with shared_rope_tables():
            return rope(q, offset), other(k, offset)

    run = mx.compile(step) if compiled else step
    got_q, got_k = run(q, k, offset)
    assert mx.array_equal(got_q, _reference(rope, q, offset)).item()
    assert mx.array_equal(got_k, _reference(other, k, offset)).item()


def test_tables_are_shared_and_scoped() -> None:
    rope, other = RoPE(64, 1e6), RoPE(64, 1e6)
    x = mx.zeros((2, 4, 1, 64))
    offset = mx.array([3, 9], dtype=mx.int32)
    with shared_rope_tables():
        from ffai_worker.models import base

        rope(x, offset)
        other(x, offset)
        assert len(base._shared.memo) == 1  # one set of cos/sin for both layers
    assert getattr(base._shared, "memo", None) is None  # nothing outlives the step
