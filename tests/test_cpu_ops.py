"""The CPU decode-step ops (cpu_ops.py, RoPE in base.py) against the MLX ops they replace."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ffai_worker.models.base import RoPE
from ffai_worker.models.cpu_ops import (
    FAST_EXP_MIN,
    NativeEmbedding,
    NativeLinear,
    RMSNorm,
    argmax,
    cpu_decode_step,
    fast_exp,
    rms_norm,
    scaled_dot_product_attention,
    silu,
    silu_mul,
)
from ffai_worker.native import quant

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


def test_silu_and_attention_inside_the_step_match_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the native kernels: the decode step's own versions (fast_exp)."""
    monkeypatch.setenv(quant.ENV_VAR, "0")
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


# -- the native kernels (kernels/act_kernels.h), where the extension is built -----------------

needs_native = pytest.mark.skipif(quant.native_ops() is None, reason=quant.describe())


def _silu64(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


@needs_native
@pytest.mark.parametrize("shape", [(5,), (3, 17), (2, 512, 4864), (1, 1, 4864)])
def test_native_silu_mul_matches_float64(shape: tuple[int, ...]) -> None:
    g = mx.random.normal(shape, key=mx.random.key(1)) * 6
    u = mx.random.normal(shape, key=mx.random.key(2))
    want = _silu64(np.array(g, dtype=np.float64)) * np.array(u, dtype=np.float64)
    err = np.abs(np.array(silu_mul(g, u), dtype=np.float64) - want)
    mlx_err = np.abs(np.array(nn.silu(g) * u, dtype=np.float64) - want)
    # as close as MLX's own ops, and within a few float32 ulps of each element
    assert err.max() <= 2 * mlx_err.max() and np.all(err <= 1e-6 * np.abs(want) + 1e-12)
    # a slice computed alone is the same to the bit (no dependence on the split)
    flat_g, flat_u = g.reshape(-1), u.reshape(-1)
    part = np.array(silu_mul(flat_g[3:40], flat_u[3:40]))
    assert np.array_equal(part, np.array(silu_mul(flat_g, flat_u)).reshape(-1)[3:40])


@needs_native
def test_native_silu_mul_edges_and_views() -> None:
    g = mx.array([0.0, -0.0, 1e-30, -100.0, 100.0, 88.5, -88.5, math.inf, -math.inf, math.nan])
    got = np.array(silu_mul(g, mx.ones_like(g)))
    want = np.array(nn.silu(g))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # inf * 0 is NaN in both
    big = mx.random.normal((64, 300), key=mx.random.key(3))
    view = big.T  # non-contiguous: copied, same result
    assert np.array_equal(
        np.array(silu_mul(view, view)), np.array(silu_mul(*(mx.array(np.array(view)),) * 2))
    )


def _softmax64(x: np.ndarray, causal: bool) -> np.ndarray:
    x = x.astype(np.float64)
    if causal:
        L, T = x.shape[-2:]
        visible = np.arange(T)[None, :] <= np.arange(L)[:, None] + (T - L)
        x = np.where(visible, x, -np.inf)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@needs_native
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(3, 1, 37), (2, 14, 64, 64), (1, 3, 100, 612), (2, 5, 16)])
def test_native_softmax_matches_float64(shape: tuple[int, ...], causal: bool) -> None:
    ext = quant.native_ops()
    x = mx.random.normal(shape, key=mx.random.key(4)) * 10
    got = np.array(ext.softmax(x, causal=causal), dtype=np.float64)
    want = _softmax64(np.array(x), causal)
    mlx = mx.softmax(x + mx.array(np.where(want == 0, -np.inf, 0.0), mx.float32), axis=-1)
    mlx_err = np.abs(np.array(mlx, dtype=np.float64) - want)
    assert np.abs(got - want).max() <= 2 * mlx_err.max() + 1e-12
    assert np.all(np.abs(got - want) <= 2e-5 * want + 1e-12)
    assert np.all(got[want == 0] == 0)  # masked columns are exactly 0
    rows = x.reshape(-1, shape[-2], shape[-1])
    alone = np.array(ext.softmax(rows[1:2], causal=causal))  # a batch row alone, to the bit
    assert np.array_equal(alone[0], np.array(ext.softmax(rows, causal=causal))[1])


@needs_native
def test_native_ops_work_compiled_and_refuse_bad_input() -> None:
    ext = quant.native_ops()
    x = mx.random.normal((4, 33), key=mx.random.key(5))
    step = mx.compile(lambda a: ext.softmax(silu_mul(a, a) * 0.5, causal=True))
    assert np.array_equal(
        np.array(step(x)), np.array(ext.softmax(silu_mul(x, x) * 0.5, causal=True))
    )
    with pytest.raises(ValueError, match="float32"):
        ext.silu_mul(x.astype(mx.float16), x.astype(mx.float16))
    with pytest.raises(ValueError, match="one shape"):
        ext.silu_mul(x, x[:2])
    with pytest.raises(ValueError, match="L <= T"):
        ext.softmax(mx.zeros((5, 3)), causal=True)


@needs_native
@pytest.mark.parametrize("kind", ["causal", "additive", "bool", "none"])
def test_native_attention_matches_mlx(kind: str) -> None:
    """cpu_ops.scaled_dot_product_attention on the native softmax: prefill (L < T, a cached
    prefix: causal keys 0..T-L+i) and decode-shaped masks, against MLX's own op."""
    q = mx.random.normal((2, 6, 40, 16), key=mx.random.key(6))
    k = mx.random.normal((2, 2, 100, 16), key=mx.random.key(7))
    v = mx.random.normal((2, 2, 100, 16), key=mx.random.key(8))
    visible = mx.arange(100)[None, :] <= mx.arange(40)[:, None] + 60
    mask: Any = {
        "causal": "causal",
        "additive": mx.where(visible, 0.0, -math.inf),
        "bool": visible,
        "none": None,
    }[kind]
    got = scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 7, 64), (2, 512, 896), (5, 100)])
def test_native_rms_norm_matches_float64(shape: tuple[int, ...]) -> None:
    x = mx.random.normal(shape, key=mx.random.key(9)) * 3
    w = mx.random.normal((shape[-1],), key=mx.random.key(10))
    x64, w64 = np.array(x, dtype=np.float64), np.array(w, dtype=np.float64)
    want = x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + 1e-6) * w64
    err = np.abs(np.array(rms_norm(x, w, 1e-6), dtype=np.float64) - want)
    mlx_err = np.abs(np.array(mx.fast.rms_norm(x, w, 1e-6), dtype=np.float64) - want)
    assert err.max() <= 2 * mlx_err.max() + 1e-7
    rows = x.reshape(-1, shape[-1])
    r = len(rows) - 1
    alone = np.array(rms_norm(rows[r:], w, 1e-6))  # a row alone, to the bit
    assert np.array_equal(alone[0], np.array(rms_norm(rows, w, 1e-6))[r])


@needs_native
def test_add_then_norm_is_one_node_with_the_same_values() -> None:
    """RMSNorm.add: the residual sum and its norm, to the bit as `x + y` then the norm."""
    norm = RMSNorm(96, eps=1e-5)
    norm.weight = mx.random.normal((96,), key=mx.random.key(15))
    x = mx.random.normal((3, 2, 96), key=mx.random.key(16))
    y = mx.random.normal((3, 2, 96), key=mx.random.key(17))
    total, normed = norm.add(x, y)
    assert np.array_equal(np.array(total), np.array(x + y))
    assert np.array_equal(np.array(normed), np.array(norm(x + y)))
    ext = quant.native_ops()
    with pytest.raises(ValueError, match="one shape"):
        ext.add_rms_norm(x, y[:1], norm.weight, 1e-5)
    with pytest.raises(ValueError, match="float32"):
        ext.add_rms_norm(x.astype(mx.float16), y.astype(mx.float16), norm.weight, 1e-5)


@needs_native
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_is_nn_linear_to_the_bit(bias: bool, tmp_path: Path) -> None:
    """NativeLinear / NativeEmbedding.as_linear: one node, the same sgemm call as MLX's
    Linear for a decode step's rows; more rows take MLX's path."""
    layer = nn.Linear(96, 200, bias=bias)
    mx.eval(layer.parameters())
    plain = nn.Linear(96, 200, bias=bias)
    plain.update(layer.parameters())
    layer.__class__ = NativeLinear
    embed = NativeEmbedding(200, 96)
    embed.weight = layer.weight
    for rows in (1, 3, 16, 40):
        x = mx.random.normal((rows, 1, 96), key=mx.random.key(rows))
        assert np.array_equal(np.array(layer(x)), np.array(plain(x)))
        assert np.array_equal(np.array(embed.as_linear(x)), np.array(x @ plain.weight.T))
    ext = quant.native_ops()
    if ext.has_sgemm():  # a BLAS is loaded (ffai_worker.native.blas): one FfaiLinear node
        dot = tmp_path / "graph.dot"
        mx.export_to_dot(str(dot), layer(mx.zeros((2, 1, 96))))
        assert "FfaiLinear" in dot.read_text() and "Transpose" not in dot.read_text()
    with pytest.raises(ValueError, match="float32"):
        ext.linear(mx.zeros((2, 95)), layer.weight)
    with pytest.raises(ValueError, match="bias must be"):
        ext.linear(mx.zeros((2, 96)), layer.weight, mx.zeros((3,)))


@needs_native
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_from_gate_columns(bias: bool) -> None:
    """NativeLinear.from_gate: the SwiGLU gate of a fused gate/up product computed inside
    the product's node, equal to the gate's own node then the layer; more rows than a
    decode step's take MLX's ops, within float tolerance."""
    layer = nn.Linear(96, 200, bias=bias)
    mx.eval(layer.parameters())
    layer.__class__ = NativeLinear
    ext = quant.native_ops()
    for rows in (1, 5, 16, 40):
        y = mx.random.normal((rows, 1, 250), key=mx.random.key(rows))  # gate at 150, up at 20
        want = layer(ext.silu_mul(y[..., 150:246], y[..., 20:116]))
        got = layer.from_gate(y, 150, 20)
        if rows <= 16 and ext.has_sgemm():
            assert np.array_equal(np.array(got), np.array(want))
        else:
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    if ext.has_sgemm():
        with pytest.raises(ValueError, match="must lie within"):
            ext.linear(mx.zeros((2, 250)), layer.weight, gate=160, up=20)  # 160 + 96 > 250
    # The gate as its own node reads the same columns the same way.
    y = mx.random.normal((3, 1, 250), key=mx.random.key(7))
    alone = ext.silu_mul_columns(y, 150, 20, 96)
    assert np.array_equal(np.array(alone), np.array(ext.silu_mul(y[..., 150:246], y[..., 20:116])))
    with pytest.raises(ValueError, match="must lie within"):
        ext.silu_mul_columns(y, 20, 160, 96)


@needs_native
def test_native_argmax_picks_what_mlx_argmax_picks() -> None:
    """cpu_ops.argmax (the native node) and mx.argmax(axis=-1) give the same index for
    random rows, ties (the first), -0.0 against 0.0, infinities and NaN (the first NaN),
    in the SIMD body and in the tail past the last 16 columns."""
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(cols).astype(np.float32) for cols in (1, 7, 16, 33, 1000, 4099)]
    big = rng.standard_normal(151936).astype(np.float32)
    big[[100, 90000]] = 9.0  # a tie: the first wins
    rows += [big, np.array([-0.0, 0.0] * 20, np.float32), np.full(40, -np.inf, np.float32)]
    for at in (0, 5, 17, 4000, 4098):  # a NaN at the start, in the body, in the tail
        row = rng.standard_normal(4099).astype(np.float32)
        row[[at, 4098]] = np.nan
        rows.append(row)
    row = np.zeros(50, np.float32)
    row[[3, 48]] = np.inf
    rows.append(row)
    for row in rows:
        x = mx.array(row)
        assert argmax(x).item() == mx.argmax(x).item(), (len(row), np.flatnonzero(np.isnan(row)))
    batch = mx.array(rng.standard_normal((3, 5, 300)).astype(np.float32))
    got = argmax(batch)
    assert got.dtype == mx.int32 and got.shape == (3, 5)
    assert np.array_equal(np.array(got), np.array(mx.argmax(batch, axis=-1)))
    with pytest.raises(ValueError, match="float32"):
        quant.native_ops().argmax(mx.zeros((2, 3), dtype=mx.int32))


@needs_native
def test_native_rms_norm_refuses_bad_input() -> None:
    ext = quant.native_ops()
    with pytest.raises(ValueError, match="float32"):
        ext.rms_norm(mx.zeros((2, 4), mx.float16), mx.ones((4,), mx.float16), 1e-6)
    with pytest.raises(ValueError, match="last width"):
        ext.rms_norm(mx.zeros((2, 4)), mx.ones((5,)), 1e-6)
    # other dtypes take MLX's op
    x16 = mx.ones((2, 4), mx.bfloat16)
    assert rms_norm(x16, mx.ones((4,), mx.bfloat16), 1e-6).dtype == mx.bfloat16


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_native_ops_plain_c_path(isa: str) -> None:
    """Below AVX-512 the elementwise kernels run their plain C loops: same bounds, rows alone
    equal to rows in a batch."""
    from ffai_worker.native import _quant

    best, threads = _quant.isa(), _quant.threads()
    if _quant.configure(0, isa) < 0:
        pytest.skip(f"this CPU has no {isa}")
    try:
        g = mx.random.normal((3, 700), key=mx.random.key(11)) * 6
        u = mx.random.normal((3, 700), key=mx.random.key(12))
        want = _silu64(np.array(g, dtype=np.float64)) * np.array(u, dtype=np.float64)
        got = np.array(silu_mul(g, u), dtype=np.float64)
        assert np.all(np.abs(got - want) <= 1e-6 * np.abs(want) + 1e-12)
        x = mx.random.normal((2, 3, 40, 90), key=mx.random.key(13)) * 10
        probs = np.array(quant.native_ops().softmax(x, causal=True), dtype=np.float64)
        exact = _softmax64(np.array(x), True)
        assert np.all(np.abs(probs - exact) <= 2e-5 * exact + 1e-12)
        w = mx.random.normal((90,), key=mx.random.key(14))
        rows = x.reshape(-1, 90)
        x64, w64 = np.array(rows, dtype=np.float64), np.array(w, dtype=np.float64)
        normed = x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + 1e-6) * w64
        assert np.allclose(np.array(rms_norm(rows, w, 1e-6)), normed, rtol=2e-6, atol=1e-6)
        alone = np.array(rms_norm(rows[5:6], w, 1e-6))
        assert np.array_equal(alone[0], np.array(rms_norm(rows, w, 1e-6))[5])
    finally:
        _quant.configure(threads, best)
