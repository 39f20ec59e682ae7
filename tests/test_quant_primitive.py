"""The native quantized-matmul MLX primitive (`ffai_worker.native._quant`), with real MLX.

Reference: `mx.dequantize` of the same quantized weights (float16 scales/biases widened to
float32 first, which is exact), then a float64 numpy product. Two tolerances, both
elementwise and relative to S = |x| @ |W|^T, the sum of absolute products behind each
output (an error bound has to scale with S, not with the output, which can cancel to ~0):

* the kernel contract, `2e-2 * S`: the real kernel may quantize activations per group to
  int8 (rounding error up to 1/254 of the group's max |x| per element, ~0.4 % of S, plus
  float32 accumulation); 2e-2 leaves room for that and still catches any wrong nibble,
  scale, bias or group index, which are O(S) errors;
* a tight one: the int8 rounding of the activations, at most (max |x| of the group) / 254
  per element, times the group's sum of |W|, plus `(K + 2) * 2**-24 * S`, the textbook
  bound for a length-K float32 dot product. The kernel must meet it on every output.
"""

from __future__ import annotations

import functools
import itertools

import mlx.core as mx
import numpy as np
import pytest

from ffai_worker.native import quant

needs_ext = pytest.mark.skipif(not quant.available(), reason=quant.describe())

LOOSE = 2e-2
TIGHT = 2.0**-24  # times (K + 2)
MS = (1, 3, 8, 16, 33)
KS = (896, 128)  # 896 = 14 * 64, Qwen2.5-0.5B's hidden size
CONFIGS = list(itertools.product((4, 8), (32, 64, 128), (False, True)))  # bits, G, f16


@functools.cache
def weights(n: int, k: int, bits: int, g: int, f16: bool) -> tuple[mx.array, ...]:
    """(w, scales, biases, dequantized float32 W) for a random (n, k) matrix."""
    rng = np.random.default_rng([n, k, bits, g])
    w = mx.array(rng.standard_normal((n, k), dtype=np.float32) * 0.05)
    wq, scales, biases = mx.quantize(w, group_size=g, bits=bits)
    if f16:
        scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    wd = mx.dequantize(
        wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=g, bits=bits
    )
    mx.eval(wq, scales, biases, wd)
    return wq, scales, biases, wd


def activations(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def check(out: mx.array, x: mx.array, wd: mx.array, g: int, *, tight: bool = True) -> None:
    k = x.shape[-1]
    x64 = np.array(x, dtype=np.float64).reshape(-1, k)
    w64 = np.array(wd, dtype=np.float64)
    got = np.array(out, dtype=np.float64).reshape(-1, w64.shape[0])
    err = np.abs(got - x64 @ w64.T)
    s = np.abs(x64) @ np.abs(w64).T
    assert out.dtype == mx.float32
    assert np.all(err <= LOOSE * s), f"max err/S {np.max(err / s):.3g} > {LOOSE}"
    if tight:
        step = np.abs(x64).reshape(len(x64), k // g, g).max(axis=2) / 254  # (M, groups)
        w_groups = np.abs(w64).reshape(len(w64), k // g, g).sum(axis=2)  # (N, groups)
        bound = 1.001 * step @ w_groups.T + (k + 2) * TIGHT * s
        assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


def qmm(
    x: mx.array, params: tuple[mx.array, ...], bits: int, g: int, *, packed: bool = False
) -> mx.array:
    """The product on MLX's row-major layout, or on `quant.pack`'s (the model's) layout."""
    wq, scales, biases = params[:3]
    if not packed:
        return quant.quant_matmul(x, wq, scales, biases, bits=bits, group_size=g)
    n = wq.shape[0]
    wq, scales, biases = (quant.pack(a) for a in (wq, scales, biases))
    return quant.quant_matmul(x, wq, scales, biases, bits=bits, group_size=g, packed_n=n)


@needs_ext
@pytest.mark.parametrize("bits,g,f16", CONFIGS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_matches_float64_reference_n64(m: int, k: int, bits: int, g: int, f16: bool) -> None:
    params = weights(64, k, bits, g, f16)
    x = activations((m, k), seed=m)
    check(qmm(x, params, bits, g), x, params[3], g)


@needs_ext
@pytest.mark.parametrize(
    "m,k,cfg",
    [(m, k, CONFIGS[i % len(CONFIGS)]) for i, (m, k) in enumerate(itertools.product(MS, KS))],
)
def test_matches_float64_reference_n4864(m: int, k: int, cfg: tuple[int, int, bool]) -> None:
    bits, g, f16 = cfg
    params = weights(4864, k, bits, g, f16)
    x = activations((m, k), seed=m + k)
    check(qmm(x, params, bits, g), x, params[3], g)


@needs_ext
@pytest.mark.parametrize(
    "m,n,cfg",
    [
        (m, n, CONFIGS[i % len(CONFIGS)])
        for i, (m, n) in enumerate(itertools.product(MS, (64, 200, 4864, 16 * 3 + 1)))
    ],
)
def test_packed_layout_matches_float64_reference(
    m: int, n: int, cfg: tuple[int, int, bool]
) -> None:
    """The packed layout: one SIMD lane per row; N = 200 and 49 leave a part-filled block."""
    bits, g, f16 = cfg
    params = weights(n, 896, bits, g, f16)
    x = activations((m, 896), seed=m + n)
    out = qmm(x, params, bits, g, packed=True)
    assert out.shape == (m, n)
    check(out, x, params[3], g)


@needs_ext
@pytest.mark.parametrize("bits,g", [(4, 32), (8, 128), (4, 128)])
def test_packed_layout_on_narrow_widths(bits: int, g: int) -> None:
    """K = 128 and 96 (a block of 16 rows then holds few words), including K < 64."""
    for k in (128, 96) if g == 32 else (128,):
        params = weights(200, k, bits, g, True)
        x = activations((5, k), seed=k)
        check(qmm(x, params, bits, g, packed=True), x, params[3], g)


def test_pack_unpack_and_row_lookup_round_trip() -> None:
    wq, scales, biases, _ = weights(200, 128, 4, 64, True)
    for a in (wq, scales, biases):
        packed = quant.pack(a)
        assert packed.shape == (13, a.shape[1], 16) and packed.dtype == a.dtype
        assert np.array_equal(np.array(quant.unpack(packed, 200)), np.array(a))
        ids = mx.array([[0, 15, 16], [199, 100, 7]])
        assert np.array_equal(np.array(quant.packed_rows(packed, ids)), np.array(a)[np.array(ids)])


@pytest.mark.parametrize("kernel", ["on", "0"])
def test_bias_is_the_same_add_as_after_the_product(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bias` inside the primitive (or after MLX's op, kernel off) equals `y + bias`."""
    monkeypatch.setenv(quant.ENV_VAR, kernel)
    wq, scales, biases, _ = weights(200, 128, 8, 64, True)
    w, s, b = (quant.pack(a) for a in (wq, scales, biases))
    x, bias = activations((3, 128)), activations((200,), seed=1)
    kw: dict = {"bits": 8, "group_size": 64, "packed_n": 200}
    plain = quant.quant_matmul(x, w, s, b, **kw) + bias
    assert np.array_equal(
        np.array(quant.quant_matmul(x, w, s, b, **kw, bias=bias)), np.array(plain)
    )
    if kernel == "on" and quant.available():
        with pytest.raises(ValueError, match="bias must be float32"):
            quant.quant_matmul(x, w, s, b, **kw, bias=bias[:100])


@pytest.mark.parametrize("kernel", ["on", "0"])
@pytest.mark.parametrize("packed", [True, False])
def test_gate_columns_are_the_silu_gate_then_the_product(
    kernel: str, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gate=(g, u)`: the input is silu(x[..., g:g+K]) * x[..., u:u+K] of a fused gate/up
    product, computed inside the primitive: equal to the native SiLU gate's node, then the
    product (MLX's own ops with the kernel off: within float tolerance)."""
    monkeypatch.setenv(quant.ENV_VAR, kernel)
    wq, scales, biases, _ = weights(200, 128, 8, 64, True)
    w, s, b = (quant.pack(a) for a in (wq, scales, biases)) if packed else (wq, scales, biases)
    kw: dict = {"bits": 8, "group_size": 64, "packed_n": 200 if packed else 0}
    y = activations((3, 1, 320))  # gate at column 160, up at 16 (any order, any place)
    g, u = y[..., 160:288], y[..., 16:144]
    ext = quant.native_ops()
    if kernel == "on" and quant.available() and ext is not None:
        want = quant.quant_matmul(ext.silu_mul(g, u), w, s, b, **kw)
        got = quant.quant_matmul(y, w, s, b, **kw, gate=(160, 16))
        assert got.shape == (3, 1, 200) and np.array_equal(np.array(got), np.array(want))
        with pytest.raises(ValueError, match="must lie within"):
            quant.quant_matmul(y, w, s, b, **kw, gate=(200, 16))  # 200 + 128 > 320
    else:
        want = quant.quant_matmul(g * mx.sigmoid(g) * u, w, s, b, **kw)
        got = quant.quant_matmul(y, w, s, b, **kw, gate=(160, 16))
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layout_without_the_kernel_uses_mlx(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernel off, packed weights are unpacked for MLX's own op."""
    monkeypatch.setenv(quant.ENV_VAR, "0")
    params = weights(200, 896, bits, 64, True)
    x = activations((3, 896))
    check(qmm(x, params, bits, 64, packed=True), x, params[3], 64, tight=False)


@needs_ext
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bits,g,f16", [(4, 64, False), (8, 32, True)])
def test_inside_mx_compile(bits: int, g: int, f16: bool, packed: bool) -> None:
    params = weights(4864, 896, bits, g, f16)

    def step(x: mx.array) -> mx.array:
        return mx.tanh(qmm(x, params, bits, g, packed=packed)) * 2.0

    fns = [mx.compile(step), mx.compile(step, shapeless=True)]  # shapeless: output_shapes
    for m in (1, 8, 8, 3):  # repeated shape: the traced graph is reused
        x = activations((m, 896), seed=m)
        want = np.array(step(x))
        for fn in fns:
            assert np.array_equal(np.array(fn(x)), want)


@needs_ext
def test_three_dimensional_input() -> None:
    params = weights(64, 896, 4, 64, False)
    x = activations((2, 5, 896))
    out = qmm(x, params, 4, 64)
    assert out.shape == (2, 5, 64)
    flat = qmm(x.reshape(10, 896), params, 4, 64)
    assert np.array_equal(np.array(out).reshape(10, 64), np.array(flat))
    check(out, x, params[3], 64)


@needs_ext
def test_non_contiguous_inputs_are_copied() -> None:
    bits, g = 4, 64
    wq, scales, biases, wd = weights(128, 896, bits, g, True)
    big = activations((12, 1024), seed=7)
    views = {
        "transposed": activations((896, 5), seed=8).T,
        "column slice": big[:, 64:960],
        "strided rows": big[::3, :896],
        "broadcast": mx.broadcast_to(big[0, :896], (4, 896)),
    }
    for name, x in views.items():
        want = qmm(mx.array(np.array(x)), (wq, scales, biases), bits, g)
        got = qmm(x, (wq, scales, biases), bits, g)
        assert np.array_equal(np.array(got), np.array(want)), name
    # every other weight row: w, scales and biases all strided
    x = activations((3, 896))
    got = qmm(x, (wq[::2], scales[::2], biases[::2]), bits, g)
    check(got, x, wd[::2], g)


@needs_ext
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bits,n", [(4, 4864), (8, 4864), (4, 64), (8, 200)])
def test_batch_invariance(bits: int, n: int, packed: bool) -> None:
    """Row r of a 9-row product is bit-identical to that row computed alone."""
    params = weights(n, 896, bits, 64, False)
    x = activations((9, 896), seed=3)
    full = np.array(qmm(x, params, bits, 64, packed=packed))
    for r in range(9):
        alone = np.array(qmm(x[r : r + 1], params, bits, 64, packed=packed))
        assert np.array_equal(full[r : r + 1], alone), f"row {r}"


def _bad_cases() -> list[tuple[str, dict[str, object], str]]:
    return [
        ("bits", {"bits": 3}, "bits must be 4 or 8"),
        ("group size", {"group_size": 16}, "group_size must be"),
        ("x dtype", {"x": mx.zeros((2, 128), dtype=mx.float16)}, "x must be float32"),
        ("x scalar", {"x": mx.array(1.0)}, "at least one dimension"),
        ("K vs G", {"x": mx.zeros((2, 96))}, "multiple of group_size"),
        ("K vs w", {"x": mx.zeros((2, 256))}, "words per row"),
        ("w dtype", {"w": mx.zeros((64, 16), dtype=mx.int32)}, "w must be a 2-D uint32"),
        ("w rank", {"w": mx.zeros((64, 16, 1), dtype=mx.uint32)}, "w must be a 2-D uint32"),
        ("scales dtype", {"scales": mx.zeros((64, 2), dtype=mx.bfloat16)}, "float32 or float16"),
        ("biases dtype", {"biases": mx.zeros((64, 2), dtype=mx.float16)}, "dtype of scales"),
        ("scales shape", {"scales": mx.zeros((64, 4))}, r"shape \(64, 2\)"),
        ("biases shape", {"biases": mx.zeros((32, 2))}, r"shape \(64, 2\)"),
    ]


@needs_ext
@pytest.mark.parametrize("name,change,message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_arguments_raise_value_error(
    name: str, change: dict[str, object], message: str
) -> None:
    wq, scales, biases, _ = weights(64, 128, 4, 64, False)
    args: dict[str, object] = {"x": mx.zeros((2, 128)), "w": wq, "scales": scales}
    args.update(biases=biases, bits=4, group_size=64)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        quant.quant_matmul(**args)  # type: ignore[arg-type]


def _bad_packed_cases() -> list[tuple[str, dict[str, object], str]]:
    return [
        ("rows", {"packed_n": 40}, r"packed w must be uint32 \(3, 16, 16\)"),
        ("negative", {"packed_n": -1}, "packed_n must be >= 0"),
        ("row-major w", {"w": mx.zeros((64, 16), dtype=mx.uint32)}, "packed w must be"),
        ("scales", {"scales": mx.zeros((4, 1, 16))}, r"shape \(4, 2, 16\)"),
        ("biases", {"biases": mx.zeros((4, 2, 8))}, r"shape \(4, 2, 16\)"),
    ]


@needs_ext
@pytest.mark.parametrize(
    "name,change,message", _bad_packed_cases(), ids=[c[0] for c in _bad_packed_cases()]
)
def test_bad_packed_arguments_raise_value_error(
    name: str, change: dict[str, object], message: str
) -> None:
    wq, scales, biases, _ = weights(64, 128, 4, 64, False)
    args: dict[str, object] = {"x": mx.zeros((2, 128)), "w": quant.pack(wq)}
    args.update(scales=quant.pack(scales), biases=quant.pack(biases), bits=4, group_size=64)
    args.update(packed_n=64)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        quant.quant_matmul(**args)  # type: ignore[arg-type]


@needs_ext
def test_no_gradient() -> None:
    params = weights(64, 128, 8, 64, False)
    with pytest.raises(RuntimeError, match="no vjp"):
        mx.grad(lambda x: qmm(x, params, 8, 64).sum())(activations((2, 128)))


@needs_ext
def test_describe_names_the_kernel_and_mlx_version() -> None:
    from ffai_worker.native import _quant

    assert _quant.built_for_mlx() == mx.__version__.split(".dev")[0]
    assert _quant.isa() in quant.describe() and _quant.threads() >= 1


@needs_ext
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bits,g,f16", [(4, 32, True), (8, 128, False)])
def test_primitive_scalar_loop_for_declined_arguments(
    bits: int, g: int, f16: bool, packed: bool
) -> None:
    """The loop the primitive runs when the kernel returns -1 meets the same bounds."""
    from ffai_worker.native import _quant

    params = weights(4864 + 5 * packed, 896, bits, g, f16)
    x = activations((3, 896), seed=11)
    before = _quant.fallbacks()
    _quant._force_fallback(True)
    try:
        out = qmm(x, params, bits, g, packed=packed)
        mx.eval(out)
    finally:
        _quant._force_fallback(False)
    assert _quant.fallbacks() == before + 1
    check(out, x, params[3], g)


@pytest.mark.parametrize("bits,g,f16", [(4, 64, True), (8, 128, False)])
def test_fallback_mlx_op_matches_reference(bits: int, g: int, f16: bool) -> None:
    """What runs without the extension: MLX's own op, float32 out even for half scales."""
    params = weights(64, 896, bits, g, f16)
    x = activations((3, 896))
    check(quant._fallback_matmul(x, *params[:3], bits, g), x, params[3], g, tight=False)


@needs_ext
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("isa", ["avx512-vnni", "avx2", "generic"])
@pytest.mark.parametrize("bits,g", [(4, 64), (8, 64), (4, 32), (8, 128)])
def test_every_instruction_set(isa: str, bits: int, g: int, packed: bool) -> None:
    """Each ISA variant meets the bound and is batch-invariant; threads change nothing."""
    from ffai_worker.native import _quant

    best = _quant.isa()
    if _quant.configure(0, isa) < 0:
        pytest.skip(f"this CPU has no {isa}")
    threads = _quant.threads()
    try:
        params = weights(4864 + 8 * packed, 896, bits, g, True)
        x = activations((9, 896), seed=3)
        out = np.array(qmm(x, params, bits, g, packed=packed))
        check(mx.array(out), x, params[3], g)
        for row in (0, 5, 8):
            alone = np.array(qmm(x[row : row + 1], params, bits, g, packed=packed))
            assert np.array_equal(alone[0], out[row]), row
        _quant.configure(1, isa)
        assert np.array_equal(np.array(qmm(x, params, bits, g, packed=packed)), out)
    finally:
        _quant.configure(threads, best)


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
def test_groups_of_32_on_a_width_not_a_multiple_of_64(bits: int) -> None:
    """K = 96: the AVX-512 path reads 64 at a time, so a narrower path must take it."""
    params = weights(256, 96, bits, 32, True)
    x = activations((5, 96), seed=4)
    out = qmm(x, params, bits, 32)
    check(out, x, params[3], 32)
    alone = qmm(x[2:3], params, bits, 32)
    assert np.array_equal(np.array(alone)[0], np.array(out)[2])
