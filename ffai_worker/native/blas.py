"""Pick the BLAS that MLX's CPU backend calls, before MLX is imported.

The Linux `mlx[cpu]` wheel links a bundled *reference* BLAS, whose `cblas_sgemm`
is unblocked and single-threaded. Loading a system OpenBLAS first with
RTLD_GLOBAL makes the dynamic linker bind libmlx's `cblas_sgemm` to OpenBLAS
instead (global-scope symbols win over a library's own dependencies). Measured
on the 2-core dev machine (float32): (512, 896) @ (896, 4864) takes 24.7 ms
instead of 2085 ms (~85x), and a (1, 896) decode-sized product 1.3 ms instead
of 4.3 ms.

When a system BLAS is chosen, `ffai_worker.native.small_gemm`'s decode-step kernel is
loaded in front of it (see that module; `FFAI_SMALL_GEMM=0` turns it off).

`FFAI_BLAS` chooses: unset or "auto" = a system OpenBLAS if one is found,
"off" / "reference" = keep MLX's bundled BLAS, anything else = the path of a
BLAS shared library to load. Once MLX is imported the choice is fixed, so this
module must never import mlx; `ffai_worker/__init__.py` calls `preload_blas()`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ffai_worker.native import small_gemm

ENV_VAR = "FFAI_BLAS"
_OFF = {"off", "reference", "none", "0", "false", "no"}
_COMMON_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",  # Debian/Ubuntu libopenblas0-*
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL, pthread build
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",  # Arch
    "/usr/local/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasState:
    """What `preload_blas` did, for start-up messages and the `info` reply."""

    kind: str  # "openblas", "custom", "reference", "platform", "unknown"
    path: str | None = None
    version: str | None = None
    detail: str | None = None  # why this choice, or the library's config string
    small_gemm: str | None = None  # the decode-step kernel in front of it, if loaded


_state: BlasState | None = None
_kernel: small_gemm.SmallGemm | None = None


def _openblas_config(lib: ctypes.CDLL) -> tuple[str | None, str | None]:
    """(version, config string) from openblas_get_config, if the library has it."""
    try:
        get_config = lib.openblas_get_config
    except AttributeError:
        return None, None
    get_config.restype = ctypes.c_char_p
    raw = get_config() or b""
    config = raw.decode(errors="replace").strip()
    words = config.split()  # "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64"
    version = words[1] if len(words) > 1 and words[0].lower() == "openblas" else None
    return version, config


def _candidates() -> list[str]:
    # Full paths first (they make a better info line), then the linker's search.
    found = [p for p in _COMMON_PATHS if Path(p).exists()]
    for name in ("openblas", "openblasp"):
        lib = ctypes.util.find_library(name)
        if lib:
            found.append(lib)
    return list(dict.fromkeys(found))


def _load(path: str) -> BlasState:
    # Open the BLAS privately first, then the small-M kernel globally, then the BLAS
    # globally: the global scope is searched in that order, so libmlx's cblas_sgemm
    # binds to the kernel, which passes other shapes on to the BLAS.
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    kernel = small_gemm.load_before_blas() if hasattr(lib, "cblas_sgemm") else None
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    if kernel is not None:
        kernel = small_gemm.attach(kernel, lib)
        global _kernel
        _kernel = kernel
    note = None if kernel is None else (kernel.detail if kernel.lib else f"off: {kernel.detail}")
    version, config = _openblas_config(lib)
    if config is not None:
        return BlasState("openblas", path, version, config, note)
    return BlasState("custom", path, None, "no openblas_get_config", note)


def _choose() -> BlasState:
    setting = os.environ.get(ENV_VAR, "auto").strip()
    if sys.platform != "linux":
        # macOS wheels link Accelerate; nothing to swap.
        return BlasState("platform", detail=f"the BLAS mlx links on {sys.platform}")
    if "mlx.core" in sys.modules:  # libmlx is loaded and its symbols are bound
        return BlasState("unknown", detail="mlx was imported before ffai_worker; BLAS not chosen")
    if setting.lower() in _OFF:
        return BlasState("reference", detail=f"{ENV_VAR}={setting}")
    if setting.lower() not in ("", "auto"):
        try:
            return _load(setting)
        except OSError as exc:
            warnings.warn(
                f"{ENV_VAR}={setting}: cannot load ({exc}); using mlx's BLAS", stacklevel=3
            )
            return BlasState("reference", detail=f"{ENV_VAR}={setting} failed to load")
    for path in _candidates():
        try:
            return _load(path)
        except OSError:
            continue
    return BlasState("reference", detail="no system OpenBLAS found")


def preload_blas() -> BlasState:
    """Load the chosen BLAS globally (once per process) and remember what happened."""
    global _state
    if _state is None:
        _state = _choose()
    return _state


def small_gemm_kernel() -> small_gemm.SmallGemm | None:
    """The small-M kernel in front of the BLAS, when one was loaded."""
    preload_blas()
    return _kernel


def blas_state() -> BlasState:
    return preload_blas()


def blas_info() -> str:
    """One line naming the BLAS MLX's CPU matmuls use, e.g. 'openblas 0.3.21 (/usr/lib/...)'."""
    s = blas_state()
    kernel = f"; small-M kernel: {s.small_gemm}" if s.small_gemm else ""
    if s.kind == "openblas":
        return f"openblas {s.version or '?'} ({s.path}){kernel}"
    if s.kind == "custom":
        return f"custom BLAS ({s.path}){kernel}"
    if s.kind == "reference":
        return f"reference (bundled with mlx; {s.detail})"
    return f"{s.kind} ({s.detail})"
