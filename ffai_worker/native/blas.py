"""Pick the BLAS that MLX's CPU backend calls, before MLX is imported.

The Linux `mlx[cpu]` wheel links a bundled *reference* BLAS, whose `cblas_sgemm`
is unblocked and single-threaded. Measured on the 2-core dev machine (float32):
that is one to two orders of magnitude slower than OpenBLAS (benchmarks/NOTES.md).

libmlx calls `cblas_sgemm` (and `cblas_dgemm`, `cblas_cgemm`) itself, so the only
way to change what it runs is a library defining those names that is loaded with
RTLD_GLOBAL before libmlx: global-scope symbols win over a library's own
dependencies. That library is our shim (`ffai_worker.native.small_gemm`, built at
install): it forwards to the chosen OpenBLAS and puts the small-M decode kernel in
front. OpenBLAS comes from, in this order:

1. a system library (`apt-get install libopenblas0-pthread`), whose plain
   `cblas_*` names could bind directly; with the kernel off it is loaded alone;
2. the `scipy-openblas32` wheel that `pip install '.[worker]'` brings on Linux,
   whose symbols carry a `scipy_` prefix: usable only through the shim.

`FFAI_BLAS` chooses: unset or "auto" = that order, "system" or "wheel" = only
that one, "off" / "reference" = keep MLX's bundled BLAS, anything else = the path
of a BLAS shared library (plain or `scipy_`-prefixed names). Once MLX is imported
the choice is fixed, so this module must never import mlx at import time;
`ffai_worker/__init__.py` calls `preload_blas()`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ffai_worker.native import small_gemm

ENV_VAR = "FFAI_BLAS"
WHEEL = "scipy-openblas32"
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
    source: str | None = None  # "system", the wheel's name, or "FFAI_BLAS"


_state: BlasState | None = None
_kernel: small_gemm.SmallGemm | None = None


class Unusable(Exception):
    """This BLAS cannot serve MLX here; try the next one."""


def _openblas_config(lib: ctypes.CDLL, prefix: str) -> tuple[str | None, str | None]:
    """(version, config string) from openblas_get_config, if the library has it."""
    try:
        get_config = getattr(lib, f"{prefix}openblas_get_config")
    except AttributeError:
        return None, None
    get_config.restype = ctypes.c_char_p
    raw = get_config() or b""
    config = raw.decode(errors="replace").strip()
    words = config.split()  # "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64"
    version = words[1] if len(words) > 1 and words[0].lower() == "openblas" else None
    return version, config


def system_candidates() -> list[str]:
    # Full paths first (they make a better info line), then the linker's search.
    found = [p for p in _COMMON_PATHS if Path(p).exists()]
    for name in ("openblas", "openblasp"):
        lib = ctypes.util.find_library(name)
        if lib:
            found.append(lib)
    return list(dict.fromkeys(found))


def wheel_library() -> str | None:
    """The OpenBLAS inside the installed scipy-openblas32 wheel (found, not imported)."""
    spec = importlib.util.find_spec(WHEEL.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        libs = sorted((Path(folder) / "lib").glob("libscipy_openblas*.so*"))
        if libs:
            return str(libs[0])
    return None


def _prefix(lib: ctypes.CDLL) -> str:
    for prefix in ("", "scipy_"):
        if all(hasattr(lib, f"{prefix}cblas_{t}gemm") for t in "sdc"):
            return prefix
    raise Unusable("it has no cblas_sgemm, cblas_dgemm and cblas_cgemm")


def _load(path: str, source: str) -> BlasState:
    # Open the BLAS privately, then the shim globally (libmlx's cblas_* bind to it and
    # it forwards to this BLAS), then a plain-named BLAS globally too, behind the
    # shim, so libmlx's LAPACK calls find OpenBLAS's as well.
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        raise Unusable(str(exc)) from exc
    prefix = _prefix(lib)
    note = None
    if prefix or small_gemm.wanted_rows() > 0:
        shim = small_gemm.load_shim()
        if isinstance(shim, str):
            if prefix:  # prefixed names: nothing else can bind libmlx to them
                raise Unusable(shim)
            note = f"off: {shim}"
        else:
            kernel = small_gemm.start(shim, lib, prefix)
            global _kernel
            _kernel = kernel
            note = kernel.detail
    if not prefix:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    version, config = _openblas_config(lib, prefix)
    if config is not None:
        return BlasState("openblas", path, version, config, note, source)
    return BlasState("custom", path, None, "no openblas_get_config", note, source)


def _candidates(setting: str) -> list[tuple[str, str]]:
    """(path, source) to try in order for an FFAI_BLAS setting of auto/system/wheel."""
    found = []
    if setting in ("", "auto", "system"):
        found += [(path, "system") for path in system_candidates()]
    wheel = wheel_library()
    if setting in ("", "auto", "wheel") and wheel is not None:
        found.append((wheel, WHEEL))
    return found


def _choose() -> BlasState:
    setting = os.environ.get(ENV_VAR, "auto").strip()
    if sys.platform != "linux":
        # macOS wheels link Accelerate; nothing to swap.
        return BlasState("platform", detail=f"the BLAS mlx links on {sys.platform}")
    if "mlx.core" in sys.modules:  # libmlx is loaded and its symbols are bound
        return BlasState("unknown", detail="mlx was imported before ffai_worker; BLAS not chosen")
    if setting.lower() in _OFF:
        return BlasState("reference", detail=f"{ENV_VAR}={setting}")
    if setting.lower() not in ("", "auto", "system", "wheel"):
        try:
            return _load(setting, ENV_VAR)
        except Unusable as exc:
            warnings.warn(f"{ENV_VAR}={setting}: {exc}; using mlx's BLAS", stacklevel=3)
            return BlasState("reference", detail=f"{ENV_VAR}={setting} unusable: {exc}")
    why = []
    for path, source in _candidates(setting.lower()):
        try:
            return _load(path, source)
        except Unusable as exc:
            why.append(f"{path}: {exc}")
    if not why:
        why.append(f"no system OpenBLAS and no {WHEEL} wheel found")
    return BlasState("reference", detail="; ".join(why))


def preload_blas() -> BlasState:
    """Load the chosen BLAS globally (once per process) and remember what happened."""
    global _state
    if _state is None:
        _state = _choose()
    return _state


def small_gemm_kernel() -> small_gemm.SmallGemm | None:
    """The shim's small-M kernel in front of the BLAS, when the shim was loaded."""
    preload_blas()
    return _kernel


def blas_state() -> BlasState:
    return preload_blas()


def blas_info() -> str:
    """One line naming the BLAS MLX's CPU matmuls use, e.g. 'openblas 0.3.21 (/usr/lib/...)'."""
    s = blas_state()
    kernel = f"; small-M kernel: {s.small_gemm}" if s.small_gemm else ""
    where = s.path if s.source in (None, "system", ENV_VAR) else f"{s.source} wheel, {s.path}"
    if s.kind == "openblas":
        return f"openblas {s.version or '?'} ({where}){kernel}"
    if s.kind == "custom":
        return f"custom BLAS ({where}){kernel}"
    if s.kind == "reference":
        return f"reference (bundled with mlx, about 30x slower; {s.detail})"
    return f"{s.kind} ({s.detail})"


def mapped_libraries() -> set[str]:
    """Shared libraries mapped into this process (Linux), resolved."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {str(Path(line.split()[-1]).resolve()) for line in lines if ".so" in line}


def self_check() -> str:
    """Real sgemms through MLX, one decode-shaped and one prefill-shaped, against float64.

    Raises AssertionError when a result is wrong or the chosen library is not mapped;
    returns a line saying what ran. Imports mlx, so only after `preload_blas()`.
    """
    import mlx.core as mx
    import numpy as np

    state = preload_blas()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 512)).astype(np.float32)  # above the kernel's smallest
    before = _kernel.calls() if _kernel else (0, 0)
    worst = 0.0
    for rows in (1, 40):  # the kernel's shape, then one beyond it (the BLAS's)
        x = rng.standard_normal((rows, 512)).astype(np.float32)
        got = np.array(mx.array(x) @ mx.array(w).T)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst < 1e-5, f"BLAS self-check: relative error {worst:.2g}"
    line = f"sgemm ok (relative error {worst:.1g})"
    if state.path is not None:
        assert str(Path(state.path).resolve()) in mapped_libraries(), f"{state.path} not mapped"
        line += f", {state.path} mapped"
    if _kernel is not None:
        taken, passed = (a - b for a, b in zip(_kernel.calls(), before, strict=True))
        assert passed >= 1, "the shim passed nothing to the BLAS"
        line += f", shim: kernel took {taken}, BLAS took {passed}"
    return line
