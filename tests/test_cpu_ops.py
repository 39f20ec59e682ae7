"""The CPU decode-step ops (cpu_ops.py, RoPE in base.py) against the MLX ops they replace."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest

from ffai_worker.models.base import RoPE
from ffai_worker.models.cpu_ops import (
    FAST_EXP_MIN,
    cpu_decode_step,
    fast_exp,
    scaled_dot_product_attention,
    silu,
)

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
        with cpu_decode_step():
            return rope(q, offset), other(k, offset)

    run = mx.compile(step) if compiled else step
    got_q, got_k = run(q, k, offset)
    assert mx.array_equal(got_q, _reference(rope, q, offset)).item()
    assert mx.array_equal(got_k, _reference(other, k, offset)).item()


def test_tables_are_shared_and_scoped() -> None:
    rope, other = RoPE(64, 1e6), RoPE(64, 1e6)
    x = mx.zeros((2, 4, 1, 64))
    offset = mx.array([3, 9], dtype=mx.int32)
    with cpu_decode_step():
        from ffai_worker.models import cpu_ops

        rope(x, offset)
        other(x, offset)
        assert len(cpu_ops._state.memo) == 1  # one set of cos/sin for both layers
    assert getattr(cpu_ops._state, "memo", None) is None  # nothing outlives the step


def test_fast_exp_is_mlx_exp_within_an_ulp() -> None:
    x = mx.concatenate(
        [
            mx.random.normal((20000,), key=mx.random.key(3)) * 30,
            mx.array([0.0, -0.0, 1.0, 87.9, -87.9, 88.5, -88.5, 1e4, -1e4, 0.5 / 1.442695]),
            mx.array([math.inf, -math.inf]),
        ]
    )
    want = mx.exp(x)
    for got in (fast_exp(x), mx.compile(fast_exp)(x)):  # its rounding trick must survive JIT
        assert mx.array_equal(mx.isinf(want), mx.isinf(got)).item()
        finite = mx.isfinite(want)
        err = mx.abs(got - want) / mx.maximum(mx.abs(want), 1e-38)
        assert mx.max(mx.where(finite, err, 0.0)).item() < 2.5e-7  # float32 ulp is 1.2e-7
    assert mx.isnan(fast_exp(mx.array([math.nan]))).item()


def test_silu_and_attention_inside_the_step_match_mlx() -> None:
    g = mx.random.normal((4, 1, 3000), key=mx.random.key(4)) * 8
    q = mx.random.normal((3, 6, 2, 16), key=mx.random.key(5))
    k = mx.random.normal((3, 2, 600, 16), key=mx.random.key(6))
    v = mx.random.normal((3, 2, 600, 16), key=mx.random.key(7))
    visible = mx.arange(600)[None, :] <= mx.array([5, 200, 599])[:, None]
    mask = mx.where(visible, 0.0, -math.inf)[:, None, None, :]
    assert g.size >= FAST_EXP_MIN and 3 * 6 * 2 * 600 >= FAST_EXP_MIN  # the fast path runs
    with cpu_decode_step():
        got_silu = silu(g)
        got_attn = scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.allclose(got_silu, nn.silu(g), rtol=5e-7, atol=1e-7).item()
    assert not mx.array_equal(got_silu, nn.silu(g)).item()  # it is another computation
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.allclose(got_attn, want, rtol=1e-5, atol=1e-6).item()
    # Outside a CPU decode step they are MLX's own ops, to the bit.
    assert mx.array_equal(silu(g), nn.silu(g)).item()
    assert mx.array_equal(scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask), want).item()
