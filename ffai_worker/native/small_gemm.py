"""The native BLAS shim and its small-M matmul kernel (`kernels/small_gemm.c`).

`ffai_worker/native/_kernels*.so` is built at install time by setuptools (see setup.py);
nothing is compiled at import. `blas.py` loads it with RTLD_GLOBAL before mlx, so
libmlx's `cblas_sgemm` / `cblas_dgemm` / `cblas_cgemm` bind to it, and hands it the
chosen BLAS's functions to forward to (MLX has no other way to be given a BLAS).
Row-major `A @ B^T` products with at most `FFAI_SMALL_GEMM` rows (default 16) run
on the kernel, every other call on the BLAS. The kernel's instruction set (AVX-512,
AVX2, NEON, generic) is picked at run time; `FFAI_SMALL_GEMM_ISA` forces one.
This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FFAI_SMALL_GEMM"
ISA_ENV = "FFAI_SMALL_GEMM_ISA"
DEFAULT_ROWS = 16
PACKAGE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class SmallGemm:
    """The loaded shim's small-M kernel, or why it does not run."""

    lib: ctypes.CDLL | None
    rows: int = 0
    threads: int = 0
    isa: str = ""
    detail: str = ""

    def calls(self) -> tuple[int, int]:
        """(calls the kernel took, calls it passed to the real BLAS) so far."""
        if self.lib is None:
            return 0, 0
        fn = self.lib.ffai_small_gemm_calls
        fn.restype = ctypes.c_long
        return int(fn(1)), int(fn(0))


def wanted_rows() -> int:
    """Rows the kernel takes: `FFAI_SMALL_GEMM` (0 or "off" disables; default 16)."""
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting in ("", "auto", "on"):
        return DEFAULT_ROWS
    if setting in ("off", "no", "false"):
        return 0
    try:
        return max(0, min(32, int(setting)))
    except ValueError:
        return DEFAULT_ROWS


def library_path() -> Path | None:
    """The shim built at install time, if the build had a C compiler."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PACKAGE_DIR / f"_kernels{suffix}"
        if path.exists():
            return path
    return None


def load_shim() -> ctypes.CDLL | str:
    """Load the shim globally (it then defines libmlx's cblas_* symbols), or say why not."""
    path = library_path()
    if path is None:
        return "native kernels not built (the install had no C compiler; reinstall with one)"
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"native kernels failed to load: {exc}"


def start(shim: ctypes.CDLL, blas: ctypes.CDLL, prefix: str) -> SmallGemm:
    """Point the shim at the real BLAS's `{prefix}cblas_*gemm` and set up the kernel."""
    pointers = [
        ctypes.cast(getattr(blas, f"{prefix}cblas_{t}gemm"), ctypes.c_void_p) for t in "sdc"
    ]
    init = shim.ffai_blas_init
    init.argtypes = [ctypes.c_void_p] * 3
    if init(*pointers) != 0:
        raise OSError("the BLAS lacks one of cblas_sgemm, cblas_dgemm, cblas_cgemm")
    rows = wanted_rows()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    try:  # tests force a pool on a one-core machine
        threads = int(os.environ.get("FFAI_SMALL_GEMM_THREADS", threads))
    except ValueError:
        pass
    try:  # the smallest weight taken, in elements; tests lower it to reach every path
        smallest = int(os.environ.get("FFAI_SMALL_GEMM_MIN_ELEMENTS", "-1"))
    except ValueError:
        smallest = -1
    isa = os.environ.get(ISA_ENV, "").strip().lower()
    kernel_init = shim.ffai_small_gemm_init
    kernel_init.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    started = int(kernel_init(rows, max(1, min(threads, 16)), smallest, isa.encode()))
    if started < 0:  # an ISA this CPU or build lacks: the best one instead
        started = int(kernel_init(rows, max(1, min(threads, 16)), smallest, b""))
    name_fn = shim.ffai_small_gemm_isa
    name_fn.restype = ctypes.c_char_p
    name = (name_fn() or b"?").decode()
    if rows == 0:
        return SmallGemm(shim, 0, 0, name, f"off ({ENV_VAR}=0)")
    return SmallGemm(shim, rows, started, name, f"M<={rows}, {started} threads, {name}")
