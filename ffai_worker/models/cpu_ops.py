"""Decode-step versions of the ops MLX runs slowly on the CPU (figures: benchmarks/NOTES.md,
"Step overhead").

MLX's CPU build computes transcendental functions with scalar SIMD (`max_size = 1`) and a
libm call per fused multiply-add: exp costs 12-57 ns per element where a multiply costs
0.5. A decode step spends that in the SiLU gate and the attention softmax. Its RoPE has
no CPU kernel at all: a generic graph per call that `mx.compile` neither fuses nor
shares between layers.

Where the native extension is loaded (`ffai_worker.native.quant.native_ops`, Linux), the
SiLU gate and the attention softmax run on its kernels (`kernels/act_kernels.h`: MLX's exp
polynomial in SIMD lanes, rows over the kernel thread pool) in prefill and decode alike:
a 512-token prefill of a 0.5B model spent over a second in MLX's libm exp.

Without it, inside `cpu_decode_step()` (the batched decoder enters it while it builds a
step, on the CPU only) the models use the versions below: the same arithmetic as MLX's
CPU kernels, rounded once more where MLX fuses a multiply-add (exp differs by at most
one ulp). Outside it, and on a GPU, they are MLX's own ops.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ffai_worker.models.quantized import fuse_groups, fused_group, project, project_columns
from ffai_worker.native.quant import native_ops

# MLX's exp (backend/cpu/simd/math.h, from Cephes): 2**x = 2**round(x) * P(fraction).
_EXP_POLY = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
    1.0,
)
_ROUND = 12582912.0  # 1.5 * 2**23: x + _ROUND - _ROUND rounds x to an integer
# fast_exp is three kernels where MLX's is one: it pays from about this many elements.
FAST_EXP_MIN = 8192
# Up to this many rows (a decode step) `gated` reads a fused gate/up product's columns
# and NativeLinear calls the BLAS itself (its small-M kernel: the same result as MLX's op).
DECODE_ROWS = 16

_state = threading.local()  # .memo: the active step's shared values (RoPE tables), else None


@contextmanager
def cpu_decode_step() -> Iterator[None]:
    """Build one decode step with the CPU versions of RoPE, SiLU and attention."""
    outer = getattr(_state, "memo", None)
    if outer is None and mx.default_device() == mx.cpu:  # a GPU has fast kernels
        _state.memo = {}
    try:
        yield
    finally:
        _state.memo = outer


def step_memo() -> dict[Any, Any] | None:
    """Values shared by all layers of the step being built; None outside a CPU decode step."""
    return getattr(_state, "memo", None)  # type: ignore[no-any-return]


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 with MLX's polynomial in plain multiplies and adds (within an ulp)."""
    y = x * 1.442695  # log2(e)
    whole = (y + _ROUND) - _ROUND
    frac = y - whole
    poly = _EXP_POLY[0] * frac + _EXP_POLY[1]
    for c in _EXP_POLY[2:]:
        poly = poly * frac + c
    bits = (mx.clip(whole, -127, 127).astype(mx.int32) + 127) << 23
    out = poly * bits.view(mx.float32)  # 2**whole * 2**frac
    out = mx.where(x > 88.0, float("inf"), out)
    return mx.where(x < -88.0, 0.0, out)


def _use_fast_exp(size: int, dtype: mx.Dtype) -> bool:
    return step_memo() is not None and dtype == mx.float32 and size >= FAST_EXP_MIN


def silu(x: mx.array) -> mx.array:
    """nn.silu; with fast_exp for large float32 inputs inside a CPU decode step."""
    if not _use_fast_exp(x.size, x.dtype):
        return nn.silu(x)
    y = 1.0 / (1.0 + fast_exp(mx.abs(x)))  # MLX's sigmoid, stable for either sign
    return x * mx.where(x < 0, y, 1.0 - y)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """mx.fast.rms_norm; one native kernel on a CPU (MLX's CPU path is three graph nodes)."""
    ext = native_ops()
    if ext is not None and x.dtype == weight.dtype == mx.float32 and weight.ndim == 1:
        return ext.rms_norm(x, weight, eps)  # type: ignore[no-any-return]
    return mx.fast.rms_norm(x, weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same checkpoint key) through `rms_norm`."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self["weight"], self.eps)

    def add(self, x: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        """(x + y, self(x + y)): a residual add and this norm, one native node (two MLX ops
        without it), the same float operations either way."""
        ext = native_ops()
        w = self["weight"]
        if ext is not None and x.dtype == y.dtype == w.dtype == mx.float32 and x.shape == y.shape:
            total, normed = ext.add_rms_norm(x, y, w, self.eps)
            return total, normed
        total = x + y
        return total, self(total)


def argmax(x: mx.array) -> mx.array:
    """`mx.argmax(x, axis=-1)` as int32, the same indices (ties and NaN included): one native
    node on a CPU, where MLX's is a scalar loop per row (8 rows of a 152K vocabulary: 1.6
    ms a decode step there, 0.1 ms here)."""
    ext = native_ops()
    if ext is not None and x.dtype == mx.float32 and x.ndim >= 1 and x.shape[-1] > 0:
        return ext.argmax(x)  # type: ignore[no-any-return]
    return mx.argmax(x, axis=-1).astype(mx.int32)


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: the SwiGLU gate, one native kernel on a CPU."""
    ext = native_ops()
    if ext is not None and gate.dtype == up.dtype == mx.float32 and gate.shape == up.shape:
        return ext.silu_mul(gate, up)  # type: ignore[no-any-return]
    return silu(gate) * up


class NativeLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys). A decode step's few float32 rows
    go through the process's BLAS (the small-M kernel) as one native node: MLX's Linear is
    a weight transpose, a flatten, the matmul and an unflatten (and a broadcast with a
    bias), each a node whose dispatch a CPU step pays. Same sgemm call, same result."""

    def __call__(self, x: mx.array) -> mx.array:
        ext = _native_linear(x, self["weight"])
        if ext is None:
            return super().__call__(x)
        return ext.linear(x, self["weight"], self["bias"] if "bias" in self else None)  # type: ignore[no-any-return]

    def from_gate(self, y: mx.array, gate: int, up: int) -> mx.array:
        """This layer over `silu(y[..., gate:gate+K]) * y[..., up:up+K]` (y a fused gate/up
        product): one native node computing the gate and the product (cpu_ops.gated_down)."""
        w, bias = self["weight"], self["bias"] if "bias" in self else None
        ext = _native_linear(y, w)
        if ext is None:
            width = int(w.shape[1])
            return self(silu_mul(y[..., gate : gate + width], y[..., up : up + width]))
        return ext.linear(y, w, bias, gate=gate, up=up)  # type: ignore[no-any-return]


class NativeEmbedding(nn.Embedding):
    """nn.Embedding whose tied output projection (`as_linear`) is NativeLinear's node."""

    def as_linear(self, x: mx.array) -> mx.array:
        ext = _native_linear(x, self["weight"])
        return super().as_linear(x) if ext is None else ext.linear(x, self["weight"])  # type: ignore[no-any-return]


class NativeFusedLinear(nn.Module):
    """Float sibling projections of one input (q/k/v, gate/up), their weights concatenated:
    one product, a column range per member (quantized.KernelFusedLinear's float twin). A
    decode step runs one native node instead of three or two; every output is the same
    dot product by the same kernel tile as unfused, so the same bits (a member without a
    bias gets zeros: `+ 0.0`, which changes no value)."""

    def __init__(self, members: Sequence[nn.Linear]) -> None:
        super().__init__()
        widths = [int(m["weight"].shape[0]) for m in members]
        starts = itertools.accumulate(widths[:-1], initial=0)
        object.__setattr__(self, "slices", tuple(zip(starts, widths, strict=True)))
        self["weight"] = mx.concatenate([m["weight"] for m in members])
        if any("bias" in m for m in members):
            zero = [mx.zeros((w,), mx.float32) for w in widths]
            self["bias"] = mx.concatenate(
                [m["bias"] if "bias" in m else z for m, z in zip(members, zero, strict=True)]
            )

    def product(self, x: mx.array) -> mx.array:
        """The members' outputs side by side, at their `slices`."""
        w, bias = self["weight"], self["bias"] if "bias" in self else None
        ext = _native_linear(x, w)
        if ext is not None:
            return ext.linear(x, w, bias)  # type: ignore[no-any-return]
        return x @ w.T if bias is None else mx.addmm(bias, x, w.T)  # nn.Linear's ops

    def __call__(self, x: mx.array) -> list[mx.array]:
        y = self.product(x)
        return [y[..., start : start + width] for start, width in self.slices]


def fuse_float_siblings(model: nn.Module) -> int:
    """Fuse each parent's float32 NativeLinear q/k/v and gate/up (one input width, all
    float32) into a NativeFusedLinear; returns how many groups."""
    return fuse_groups(model, NativeFusedLinear, _float_fusable)


def _float_fusable(members: list[Any]) -> bool:
    if not all(type(m) is NativeLinear for m in members):
        return False
    width = members[0]["weight"].shape[1]
    arrays = [m[key] for m in members for key in ("weight", "bias") if key in m]
    same_width = all(m["weight"].shape[1] == width for m in members)
    return same_width and all(a.dtype == mx.float32 for a in arrays)


def _native_linear(x: mx.array, w: mx.array) -> Any:
    """The extension when it should run this product (float32, decode-sized), else None."""
    rows = x.size // max(1, x.shape[-1])
    if rows > DECODE_ROWS or x.dtype != mx.float32 or w.dtype != mx.float32:
        return None
    ext = native_ops()
    return ext if ext is not None and ext.has_sgemm() else None


def use_native_linear(model: nn.Module) -> int:
    """Switch the float Linear and Embedding layers to NativeLinear/NativeEmbedding (the
    native node is taken per call, where it applies); returns how many."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = NativeLinear
        elif type(module) is nn.Embedding:
            module.__class__ = NativeEmbedding
        else:
            continue
        switched += 1
    return switched


def gated(x: mx.array, gate_proj: Any, up_proj: Any) -> mx.array:
    """silu(gate_proj(x)) * up_proj(x). For a decode step's few rows with gate/up fused on
    the native kernel, the gate reads the fused product's columns directly: one graph node
    where two slices and the gate were three."""
    ext = native_ops()
    rows = x.size // max(1, x.shape[-1])
    if ext is not None and rows <= DECODE_ROWS and fused_group((gate_proj, up_proj)):
        (y, gate, width), (_, up, _) = project_columns(x, gate_proj, up_proj)  # float32
        return ext.silu_mul_columns(y, gate, up, width)  # type: ignore[no-any-return]
    return silu_mul(*project(x, gate_proj, up_proj))


def gated_down(x: mx.array, gate_proj: Any, up_proj: Any, down_proj: Any) -> mx.array:
    """down_proj(silu(gate_proj(x)) * up_proj(x)). For a decode step's few rows with gate/up
    fused and a down projection that computes the gate itself (`from_gate`: the native
    quantized and float layers), one node where the gate and the product were two, with
    the same float operations (the product's node runs the gate's kernel)."""
    rows = x.size // max(1, x.shape[-1])
    takes_gate = hasattr(down_proj, "from_gate") and native_ops() is not None
    if takes_gate and rows <= DECODE_ROWS and fused_group((gate_proj, up_proj)):
        (y, gate, _), (_, up, _) = project_columns(x, gate_proj, up_proj)
        return down_proj.from_gate(y, gate, up)  # type: ignore[no-any-return]
    return down_proj(gated(x, gate_proj, up_proj))  # type: ignore[no-any-return]


def _softmax(scores: mx.array) -> mx.array:
    e = fast_exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: mx.array | str | None
) -> mx.array:
    """mx.fast.scaled_dot_product_attention: (B, H, L, D) over (B, Hkv, T, D) -> (B, H, L, D).

    On the CPU that op is the same graph (scale, matmul, mask, softmax, matmul) with MLX's exp;
    here the softmax is the native kernel (float32; "causal" applied inside it), or, without
    it, fast_exp inside a decode step when the scores are large enough.
    """
    B, H, L, D = q.shape
    n_kv, T = k.shape[1], k.shape[2]
    causal = isinstance(mask, str)
    supported = mask is None or isinstance(mask, mx.array) or mask == "causal"
    ext = native_ops() if supported and q.dtype == mx.float32 else None
    if ext is None and (causal or not _use_fast_exp(B * H * L * T, q.dtype)):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    rows = (q * scale).reshape(B, n_kv, H // n_kv * L, D)  # a key head's queries together
    scores = (rows @ k.swapaxes(-1, -2)).reshape(B, H, L, T)
    if isinstance(mask, mx.array):
        bool_mask = mask.dtype == mx.bool_
        scores = mx.where(mask, scores, -math.inf) if bool_mask else scores + mask
    probs = ext.softmax(scores, causal=causal) if ext is not None else _softmax(scores)
    probs = probs.reshape(B, n_kv, H // n_kv * L, T)
    return (probs @ v).reshape(B, H, L, -1)
