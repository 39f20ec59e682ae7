"""Weight-only 4-/8-bit matmul on the CPU: our MLX primitive, or MLX's own op.

`ffai_worker.native._quant` (built at install from `kernels/quant_ops.cpp`, see setup.py)
is an MLX custom primitive, so it runs inside `mx.compile`d functions like any MLX op.
It is a C++ extension tied to the exact mlx version whose headers it was compiled
against; with another mlx, on another OS, or when it was not built, `quant_matmul` runs
`mx.quantized_matmul` instead: the same result within float tolerance, slower on Linux.
Importing this module never runs a compiler; a failed import only changes `describe()`.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import mlx.core as mx

_ext: ModuleType | None = None
_why_off: str = ""
ENV_VAR = "FFAI_QUANT_KERNEL"  # "0"/"off": MLX's own op; an ISA name: that instruction set
THREADS_ENV = "FFAI_QUANT_THREADS"
PACK_ROWS = 16  # rows per block of the packed layout: one per SIMD lane
_OFF = {"0", "off", "no", "false"}


def _load() -> None:
    """Import the extension once; remember why it is off if it is."""
    global _ext, _why_off
    if not sys.platform.startswith("linux"):
        _why_off = f"the native quantized matmul is Linux-only (this is {sys.platform})"
        return
    try:
        ext = importlib.import_module("ffai_worker.native._quant")
    except ImportError as exc:
        _why_off = f"not built ({exc}); reinstall with a C++ compiler to build it"
        return
    built, running = ext.built_for_mlx(), mx.__version__
    if built != running.split(".dev")[0]:
        _why_off = f"built for mlx {built} but mlx {running} is installed; reinstall ffai"
        return
    _ext = ext
    _configure(ext)


def _configure(ext: ModuleType) -> None:
    """One thread per core this process may use, and the ISA `FFAI_QUANT_KERNEL` names."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    try:
        threads = int(os.environ.get(THREADS_ENV, threads))
    except ValueError:
        pass
    isa = os.environ.get(ENV_VAR, "").strip().lower()
    isa = "" if isa in ("", "auto", "on", "1") else isa
    if ext.configure(max(1, min(threads, 16)), isa) < 0:  # an ISA this CPU lacks
        ext.configure(max(1, min(threads, 16)), "")


_load()


def available() -> bool:
    """True when the native primitive is loaded, matches the running mlx and is not
    turned off with `FFAI_QUANT_KERNEL=0` (read at each call, so a test can flip it)."""
    return _ext is not None and os.environ.get(ENV_VAR, "").strip().lower() not in _OFF


def native_ops() -> ModuleType | None:
    """The extension, for its elementwise kernels (`silu_mul`, `softmax`), when it is
    loaded and not turned off and the default device is the CPU; else None."""
    if _ext is None or not available() or mx.default_device() != mx.cpu:
        return None
    return _ext


def describe() -> str:
    """One line for start-up messages: what runs quantized matmuls, or why not ours."""
    if _ext is None:
        return f"quantized matmul: mx.quantized_matmul ({_why_off})"
    if not available():
        return f"quantized matmul: mx.quantized_matmul ({ENV_VAR}=0)"
    return (
        f"quantized matmul: native {_ext.isa()}, {_ext.threads()} thread(s), "
        f"mlx {_ext.built_for_mlx()}"
    )


def _fallback_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    """MLX's own op, float32 throughout (float16 scales would make the output float16)."""
    return mx.quantized_matmul(
        x,
        w,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        transpose=True,
        group_size=group_size,
        bits=bits,
    )


def pack(a: mx.array) -> mx.array:
    """A `(N, C)` weight, scale or bias array in the kernel's packed layout `(Np/16, C, 16)`.

    Rows go in blocks of 16 (zero rows pad N up to a multiple of 16) and item c of a
    block's 16 rows sits side by side. A block's weights are then one contiguous stream,
    and one SIMD load holds a word of 16 rows, each lane summing its own row
    (`kernels/quant_packed_x86.h`). Pack `w`, `scales` and `biases` alike."""
    pad = -a.shape[0] % PACK_ROWS
    if pad:
        a = mx.concatenate([a, mx.zeros((pad, a.shape[1]), a.dtype)])
    return mx.contiguous(a.reshape(-1, PACK_ROWS, a.shape[1]).swapaxes(1, 2))


def unpack(a: mx.array, n: int) -> mx.array:
    """`pack`'s inverse: the first `n` rows, `(n, C)`."""
    return a.swapaxes(1, 2).reshape(-1, a.shape[1])[:n]


def packed_rows(a: mx.array, ids: mx.array) -> mx.array:
    """Rows `ids` (any shape) of a packed array, `ids.shape + (C,)`: an embedding lookup."""
    return a[ids // PACK_ROWS, :, ids % PACK_ROWS]


def quant_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
    packed_n: int = 0,
    bias: mx.array | None = None,
    gate: tuple[int, int] | None = None,
) -> mx.array:
    """`x[..., K] @ dequantize(w, scales, biases)^T (+ bias)` -> float32 `[..., N]`.

    MLX's affine format as `mx.quantize` writes it: `w` uint32 `(N, K*bits/32)`,
    `scales`/`biases` float32 or float16 `(N, K/group_size)`; `x` float32. With
    `packed_n = N > 0`, all three are in `pack`'s layout instead. `bias` (float32, `(N,)`)
    is added inside the primitive: the same float add, one graph node fewer. With
    `gate = (g, u)`, `x` is a fused gate/up product and the input its SwiGLU gate,
    `silu(x[..., g:g+K]) * x[..., u:u+K]`, computed inside the primitive (one node fewer).
    """
    if _ext is None or not available():
        if gate is not None:
            width = w.shape[1] * 32 // bits  # K, in either layout
            g, u = (x[..., c : c + width] for c in gate)
            x = g * mx.sigmoid(g) * u
        if packed_n:
            w, scales, biases = (unpack(a, packed_n) for a in (w, scales, biases))
        y = _fallback_matmul(x, w, scales, biases, bits, group_size)
        return y if bias is None else y + bias
    # CPU-only primitive: keep the caller's stream (e.g. `with mx.stream(...)`) when the
    # default device is the CPU, and name the CPU only where the default is a GPU.
    stream = None if mx.default_device() == mx.cpu else mx.cpu
    g, u = gate if gate is not None else (-1, -1)
    return _ext.quant_matmul(
        x, w, scales, biases, bits, group_size, packed_n, bias=bias, gate=g, up=u, stream=stream
    )
