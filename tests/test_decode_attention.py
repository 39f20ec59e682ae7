"""The native decode attention (`kernels/attn_kernels.h`: `kv_write` + `decode_attention`)
against a float64 reference written from the definitions: RoPE (rotate_half, partial,
scaled positions, LongRoPE's mscale), the KV write, sliding windows and Gemma 2's softcap.
The engine-level proof (every architecture's greedy tokens against transformers, with
and without these kernels) is in test_engine_parity.py.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from ffai_worker.native import quant

ext = quant.native_ops()
pytestmark = pytest.mark.skipif(ext is None, reason=quant.describe())


def _rope64(x: np.ndarray, pos: int, inv: np.ndarray, scale: float, mscale: float) -> np.ndarray:
    """Rotation in float64 of float32 angles, as every RoPE here (and MLX's) computes them."""
    half = len(inv)
    theta = (np.float32(pos) * np.float32(scale) * inv.astype(np.float32)).astype(np.float64)
    c, s = np.cos(theta), np.sin(theta)
    x1, x2 = x[..., :half] * mscale, x[..., half : 2 * half] * mscale
    out = x.copy()
    out[..., :half] = x1 * c - x2 * s
    out[..., half : 2 * half] = x2 * c + x1 * s
    return out


def _reference(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """(attention (B, 1, H*D), keys, values) in float64, row by row, head by head."""
    B, n_kv, _, D = arrays["kc"].shape
    H = case["heads"]
    inv = arrays["inv"].astype(np.float64)
    rs, ms, window, cap = case["rope_scale"], case["mscale"], case["window"], case["softcap"]
    kc, vc = arrays["kc"].astype(np.float64), arrays["vc"].astype(np.float64)
    q = arrays["q"].astype(np.float64).reshape(B, H, D)
    k = arrays["k"].astype(np.float64).reshape(B, n_kv, D)
    out = np.zeros((B, H, D))
    for b, pos in enumerate(arrays["pos"].tolist()):
        kc[b, :, pos] = _rope64(k[b], pos, inv, rs, ms)
        vc[b, :, pos] = arrays["v"].astype(np.float64).reshape(B, n_kv, D)[b]
        start = max(0, pos - window + 1) if window else 0
        for h in range(H):
            g = h // (H // n_kv)
            scores = kc[b, g, start : pos + 1] @ (
                _rope64(q[b, h], pos, inv, rs, ms) * case["scale"]
            )
            if cap:
                scores = np.tanh(scores / cap) * cap
            w = np.exp(scores - scores.max())
            out[b, h] = (w / w.sum()) @ vc[b, g, start : pos + 1]
    return out.reshape(B, 1, H * D), kc, vc


CASES = {
    "qwen-like": dict(batch=1, heads=14, kv=2, dim=64, cap=64, rope=64),
    "batch, every head its own": dict(batch=3, heads=4, kv=4, dim=32, cap=40, rope=32),
    "window": dict(batch=4, heads=8, kv=2, dim=64, cap=100, rope=64, window=7),
    "softcap, odd dims": dict(batch=2, heads=6, kv=3, dim=24, cap=20, rope=24, softcap=30.0),
    "partial rotary, longrope": dict(
        batch=2, heads=4, kv=2, dim=32, cap=50, rope=16, mscale=1.19, rope_scale=0.25
    ),
    "long, shared over threads": dict(batch=8, heads=14, kv=2, dim=64, cap=700, rope=64),
}


def _make(spec: dict[str, Any], seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    B, H, n_kv, D, T, R = (spec[k] for k in ("batch", "heads", "kv", "dim", "cap", "rope"))
    case = {
        "heads": H,
        "scale": D**-0.5,
        "window": spec.get("window", 0),
        "softcap": spec.get("softcap", 0.0),
        "rope_scale": spec.get("rope_scale", 1.0),
        "mscale": spec.get("mscale", 1.0),
    }

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    arrays = {
        "q": normal(B, 1, H * D) * 2,
        "k": normal(B, 1, n_kv * D) * 2,
        "v": normal(B, 1, n_kv * D),
        "kc": normal(B, n_kv, T, D) * 2,
        "vc": normal(B, n_kv, T, D),
        "pos": np.concatenate([[T - 1], rng.integers(0, T, B - 1)]).astype(np.int32),
        "inv": (1.0 / 10000 ** (np.arange(0, R, 2) / R)).astype(np.float32),
    }
    return case, arrays


def _native(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[mx.array, ...]:
    a = {name: mx.array(x) for name, x in arrays.items()}
    rope = {"inv_freq": a["inv"], "rope_scale": case["rope_scale"], "rope_mscale": case["mscale"]}
    keys = ext.kv_write(a["kc"], a["k"], a["pos"], **rope)
    values = ext.kv_write(a["vc"], a["v"], a["pos"])
    out = ext.decode_attention(
        a["q"],
        keys,
        values,
        a["pos"],
        **rope,
        scale=case["scale"],
        window=case["window"],
        softcap=case["softcap"],
    )
    mx.eval(out, keys, values)
    return out, keys, values


def _check(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    got = [np.array(x, dtype=np.float64) for x in _native(case, arrays)]
    want = _reference(case, arrays)
    assert np.allclose(got[0], want[0], rtol=1e-4, atol=2e-5)
    assert np.allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[2], want[2])  # values are copied, not computed
    untouched = np.ones(arrays["kc"].shape[:3], dtype=bool)
    for b, pos in enumerate(arrays["pos"].tolist()):
        untouched[b, :, pos] = False
    assert np.array_equal(got[1][untouched], arrays["kc"][untouched])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name: str) -> None:
    _check(*_make(CASES[name]))


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_plain_c_path(isa: str) -> None:
    from ffai_worker.native import _quant

    best, threads = _quant.isa(), _quant.threads()
    if _quant.configure(0, isa) < 0:
        pytest.skip(f"this CPU has no {isa}")
    try:
        for name in ("window", "softcap, odd dims", "partial rotary, longrope"):
            _check(*_make(CASES[name]))
    finally:
        _quant.configure(threads, best)


def test_rows_alone_equal_rows_in_batch_and_threads_agree() -> None:
    """A row's result, to the bit, does not depend on the other rows or the thread count."""
    from ffai_worker.native import _quant

    case, arrays = _make(CASES["long, shared over threads"], seed=1)
    together = np.array(_native(case, arrays)[0])
    for b in (0, 5):
        alone = {k: v[b : b + 1] if k != "inv" else v for k, v in arrays.items()}
        assert np.array_equal(np.array(_native(case, alone)[0])[0], together[b])
    threads = _quant.threads()
    try:
        _quant.configure(1, "")
        assert np.array_equal(np.array(_native(case, arrays)[0]), together)
    finally:
        _quant.configure(threads, "")


def test_columns_of_one_fused_projection() -> None:
    """q, k and v as columns of one (B, 1, q | k | v) array, as a fused projection makes
    them: the same results, to the bit, as separate arrays."""
    case, arrays = _make(CASES["window"])
    a = {name: mx.array(x) for name, x in arrays.items()}
    qkv = mx.concatenate([a["q"], a["k"], a["v"]], axis=-1)
    q_width, k_width = arrays["q"].shape[-1], arrays["k"].shape[-1]
    rope = {"inv_freq": a["inv"]}
    keys = ext.kv_write(a["kc"], qkv, a["pos"], **rope, column=q_width)
    values = ext.kv_write(a["vc"], qkv, a["pos"], column=q_width + k_width)
    heads = case["heads"]
    out = ext.decode_attention(qkv, keys, values, a["pos"], **rope, window=7, heads=heads)
    want = [np.array(x) for x in _native({**case, "scale": 1.0}, arrays)]
    assert out.shape == (arrays["q"].shape[0], 1, q_width)
    for got, expected in zip((out, keys, values), want, strict=True):
        assert np.array_equal(np.array(got), expected)


def _address(a: mx.array) -> int:
    view = np.array(a, copy=False)
    return int(view.__array_interface__["data"][0])


def test_cache_written_in_place_only_when_donated() -> None:
    _, arrays = _make(CASES["qwen-like"])
    held = mx.array(arrays["kc"])
    new = ext.kv_write(held, mx.array(arrays["k"]), mx.array(arrays["pos"]))
    mx.eval(new)
    assert np.array_equal(np.array(held), arrays["kc"])  # still held: a copy was written
    address = _address(new)
    for step in range(3):  # the decoder's pattern: the old cache is dropped before eval
        new = ext.kv_write(new, mx.array(arrays["k"]) + step, mx.array([step], dtype=mx.int32))
        mx.eval(new)
        assert _address(new) == address


def test_refuses_bad_input() -> None:
    _, arrays = _make(CASES["window"])
    a = {name: mx.array(x) for name, x in arrays.items()}
    with pytest.raises(ValueError, match="float32"):
        ext.kv_write(a["kc"].astype(mx.float16), a["k"], a["pos"])
    with pytest.raises(ValueError, match="do not fit"):
        ext.kv_write(a["kc"], a["k"], a["pos"], column=1)
    with pytest.raises(ValueError, match="do not fit"):
        ext.decode_attention(a["q"], a["kc"], a["vc"], a["pos"], heads=9)
    with pytest.raises(ValueError, match="int32"):
        ext.kv_write(a["kc"], a["k"], a["pos"].astype(mx.int64))
    with pytest.raises(ValueError, match="inv_freq"):
        ext.kv_write(a["kc"], a["k"], a["pos"], mx.ones((40,)))
    with pytest.raises(ValueError, match="multiple of the key heads"):
        ext.decode_attention(a["q"][..., :192], a["kc"], a["vc"], a["pos"])
    with pytest.raises(ValueError, match="one shape"):
        ext.decode_attention(a["q"], a["kc"], a["vc"][:, :, :10], a["pos"])
    outside = mx.array([100, 0, 0, 0], dtype=mx.int32)  # the cache holds 100 positions
    with pytest.raises(RuntimeError, match="outside the cache"):
        mx.eval(ext.decode_attention(a["q"], a["kc"], a["vc"], outside))
