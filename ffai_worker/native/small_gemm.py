"""The small-M matmul kernel (`kernels/small_gemm.c`): build once, load before the BLAS.

MLX's CPU backend calls `cblas_sgemm` even for a decode step's few rows, and
OpenBLAS's sgemm repacks the whole weight matrix on every call (see the C file
for figures). The kernel defines its own `cblas_sgemm`: loaded with
RTLD_GLOBAL *before* the real BLAS, it is the one libmlx binds to; it takes
row-major `A @ B^T` products with at most `FFAI_SMALL_GEMM` rows (default 16)
and hands every other call to the real library.

It is compiled with the system C compiler on first use (about a second) into
`~/.cache/ffai/kernels/`, keyed by the source, the flags and the CPU, like
MLX's own compiled CPU kernels. No compiler, or `FFAI_SMALL_GEMM=0`: the
worker runs on the BLAS alone and says so. This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "FFAI_SMALL_GEMM"
DEFAULT_ROWS = 16
SOURCE = Path(__file__).with_name("kernels") / "small_gemm.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-std=c11"]


@dataclass(frozen=True)
class SmallGemm:
    """The loaded kernel, or why there is none."""

    lib: ctypes.CDLL | None
    rows: int = 0
    threads: int = 0
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


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ffai" / "kernels"


def _cpu_key() -> str:
    # -march=native code is only valid on the CPU it was built for.
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str) -> Path:
    """The kernel's shared library, compiled now unless the cache has it."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()
    target = _cache_dir() / f"small_gemm-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, "-o", str(out), str(SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(out, target)  # atomic: concurrent workers never load half a file
    return target


def load_before_blas() -> SmallGemm:
    """Build and load the kernel (RTLD_GLOBAL); call `attach` once the real BLAS is loaded."""
    rows = wanted_rows()
    if rows == 0:
        return SmallGemm(None, detail=f"{ENV_VAR}=0")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return SmallGemm(None, detail="no C compiler to build it")
    try:
        path = build(compiler)
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as exc:
        return SmallGemm(None, detail=f"build failed: {exc}")
    return SmallGemm(lib, rows=rows)


def attach(kernel: SmallGemm, blas: ctypes.CDLL) -> SmallGemm:
    """Point the kernel at the real `cblas_sgemm` and start its threads."""
    if kernel.lib is None:
        return kernel
    real = ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p).value
    init = kernel.lib.ffai_small_gemm_init
    init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    try:  # the smallest weight taken, in elements; tests lower it to reach every path
        smallest = int(os.environ.get("FFAI_SMALL_GEMM_MIN_ELEMENTS", "-1"))
    except ValueError:
        smallest = -1
    started = int(init(real, kernel.rows, max(1, min(threads, 16)), smallest))
    return SmallGemm(kernel.lib, kernel.rows, started, f"M<={kernel.rows}, {started} threads")
