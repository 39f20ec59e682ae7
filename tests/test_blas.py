"""The BLAS MLX runs on Linux: the wheel's OpenBLAS without a system one, the native shim
and its small-M kernel per instruction set, and the shim's thread pool across fork()."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ffai_worker.native import blas, small_gemm  # never mlx here: subprocesses choose their BLAS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the shim is Linux-only")


def system_openblas_files() -> set[Path]:
    """Every system OpenBLAS file the worker could find (resolved through symlinks)."""
    found = [Path(p) for p in blas._COMMON_PATHS]
    if shutil.which("ldconfig"):
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        found += [Path(ln.split(" => ")[1]) for ln in cache.splitlines() if "libopenblas" in ln]
    return {p.resolve() for p in found if p.exists()}


def without_system_blas(argv: list[str]) -> list[str]:
    """argv run where no system OpenBLAS can be loaded: each file is covered by /dev/null
    in a private mount namespace (root only), as on a machine that never installed one."""
    hidden = sorted(system_openblas_files())
    if not hidden:
        return argv
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a system OpenBLAS is installed and cannot be hidden without root")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here to hide the system OpenBLAS")
    mounts = " && ".join(f"mount --bind /dev/null '{p}'" for p in hidden)
    return ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]


def need_shim() -> None:
    if small_gemm.library_path() is None:
        if shutil.which("cc") or shutil.which("gcc"):  # the install should have built it
            pytest.fail("ffai_worker/native/_kernels*.so is missing: run `pip install -e .`")
        pytest.skip("no C compiler: the native shim cannot have been built")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FFAI_BLAS", "FFAI_SMALL"))}
    return {**base, "PYTHONPATH": str(REPO), **extra}


SELF_CHECK = """
import ffai_worker
from ffai_worker.native.blas import blas_info, mapped_libraries, self_check
print(blas_info())
print(self_check())
print(*sorted(p for p in mapped_libraries() if "openblas" in p), sep="\\n")
"""


def run_check(argv_env: dict[str, str], hide: bool) -> tuple[list[str], str]:
    """(stdout lines, the library libmlx's cblas_sgemm was bound to) of SELF_CHECK."""
    argv = [sys.executable, "-c", SELF_CHECK]
    done = subprocess.run(
        without_system_blas(argv) if hide else argv,
        env={**argv_env, "LD_DEBUG": "bindings"},  # the loader reports every binding
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bound = [
        ln.split(" to ", 1)[1].split(" [")[0]
        for ln in done.stderr.splitlines()
        if "libmlx.so" in ln.split(" to ")[0] and ln.rstrip().endswith("`cblas_sgemm'")
    ]
    assert len(bound) == 1, bound
    return done.stdout.splitlines(), bound[0]


def test_without_a_system_blas_mlx_runs_on_the_wheels_openblas() -> None:
    need_shim()
    wheel = blas.wheel_library()
    assert wheel is not None, "scipy-openblas32 is a worker dependency on Linux"
    lines, bound = run_check(env(), hide=True)
    info, check, mapped = lines[0], lines[1], lines[2:]
    assert info.startswith("openblas 0.3.") and "scipy-openblas32 wheel" in info, info
    assert "small-M kernel: M<=16" in info
    assert check.startswith("sgemm ok") and "kernel took 1, BLAS took 1" in check, check
    assert str(Path(wheel).resolve()) in mapped  # (numpy's own OpenBLAS may be there too)
    assert not set(mapped) & {str(p) for p in system_openblas_files()}
    assert Path(bound) == small_gemm.library_path()  # libmlx's sgemm calls the shim


def test_a_prefixed_library_can_be_named_and_the_kernel_turned_off() -> None:
    need_shim()
    wheel = blas.wheel_library()
    assert wheel is not None
    lines, bound = run_check(env(FFAI_BLAS=wheel, FFAI_SMALL_GEMM="0"), hide=False)
    assert lines[0].startswith("openblas 0.3.") and wheel in lines[0], lines[0]
    assert "small-M kernel: off" in lines[0]
    # With the kernel off the shim only forwards: the small product went to the BLAS too.
    assert "kernel took 0, BLAS took 2" in lines[1], lines[1]
    assert Path(bound) == small_gemm.library_path()


def test_a_worker_started_without_a_system_blas_names_the_wheel() -> None:
    need_shim()
    folder = tempfile.mkdtemp(prefix="ffai-blas-")
    argv = [sys.executable, "-m", "ffai_worker.cli", "serve", "--endpoint", f"ipc://{folder}/w"]
    log_path = Path(folder) / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(without_system_blas(argv), env=env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while b"serving on" not in log_path.read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    blas_lines = [ln for ln in log_path.read_text().splitlines() if "BLAS:" in ln]
    assert len(blas_lines) == 1 and "scipy-openblas32 wheel" in blas_lines[0], blas_lines


KERNEL_CHECK = """
import ffai_worker
from ffai_worker.native.blas import small_gemm_kernel
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
worst = blas_gap = 0.0
shapes = [(1, 4864, 896), (3, 896, 4864), (8, 1000, 67), (5, 300, 40), (2, 17, 5), (13, 301, 67)]
for m, n, k in [*shapes, (16, 64, 129)]:
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (n,)))
    got = np.array(mx.addmm(mx.array(b), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0))
    want = 0.5 * (x.astype(np.float64) @ w.T.astype(np.float64)) + 2.0 * b
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    plain, exact = np.array(mx.array(x) @ mx.array(w).T), x.astype(np.float64) @ w.T
    worst = max(worst, float(np.abs(plain - exact).max() / np.abs(exact).max()))
    # The same rows padded past the kernel's 16 rows run on OpenBLAS: within float tolerance.
    padded = np.concatenate([x, np.zeros((17, k), np.float32)])
    ob = np.array(mx.array(padded) @ mx.array(w).T)[:m]
    blas_gap = max(blas_gap, float(np.abs(plain - ob).max() / np.abs(exact).max()))
# One row alone or among 12 or 15 others (tiles of 8, 4 and 1 rows), at every position:
# bit-identical.
x, w = (rng.standard_normal(s).astype(np.float32) for s in ((16, 899), (4864, 899)))
W = mx.array(w)
batched = [np.array(mx.array(x[:rows]) @ W.T) for rows in (16, 13)]
alone = [np.array(mx.array(x[i:i+1]) @ W.T) for i in range(16)]
invariant = all((alone[i] == b[i:i+1]).all() for b in batched for i in range(len(b)))
kernel = small_gemm_kernel()
print(kernel.isa, worst, blas_gap, invariant, *kernel.calls())
"""


def supported_isas() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isas = ["generic"]
    if " avx2" in flags and " fma" in flags:
        isas.insert(0, "avx2")
    if " avx512f" in flags and " fma" in flags:
        isas.insert(0, "avx512")
    return isas


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_instruction_set_is_exact_and_batch_invariant(isa: str) -> None:
    need_shim()
    if isa not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    extra = {"FFAI_SMALL_GEMM": "16", "FFAI_SMALL_GEMM_ISA": isa}
    extra["FFAI_SMALL_GEMM_MIN_ELEMENTS"] = "0"  # small shapes too: every tile and tail
    done = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env(**extra), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ran, worst, gap, invariant, taken, passed = done.stdout.split()
    assert ran == isa
    assert float(worst) < 1e-5 and float(gap) < 1e-5 and invariant == "True"
    assert int(taken) >= 32 and int(passed) >= 7  # M <= 16 taken; the padded ones passed


FORK_CHECK = """
import ctypes, os, signal
import ffai_worker
from ffai_worker.native.blas import small_gemm_kernel
import numpy as np
sgemm = small_gemm_kernel().lib.cblas_sgemm
def product(x, w):
    out = np.zeros((x.shape[0], w.shape[0]), np.float32)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    sgemm(101, 111, 112, x.shape[0], w.shape[0], x.shape[1], ctypes.c_float(1.0), p(x),
          x.shape[1], p(w), w.shape[1], ctypes.c_float(0.0), p(out), w.shape[0])
    return out
rng = np.random.default_rng(0)
x, w = rng.standard_normal((4, 512), np.float32), rng.standard_normal((4096, 512), np.float32)
first = product(x, w)  # starts the pool's threads in this process
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a child spinning on the parent's (absent) threads dies here
    os._exit(0 if (product(x, w) == first).all() else 3)
_, status = os.waitpid(pid, 0)
same = (product(x, w) == first).all()
print(os.waitstatus_to_exitcode(status), same, *small_gemm_kernel().calls())
"""


def test_the_kernels_thread_pool_survives_fork() -> None:
    need_shim()
    extra = {"FFAI_SMALL_GEMM_THREADS": "2"}  # a pool even on a one-core machine
    done = subprocess.run(
        [sys.executable, "-c", FORK_CHECK],
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    child, parent_same, taken, _ = done.stdout.split()
    assert child == "0" and parent_same == "True"
    assert int(taken) == 2  # the parent's two products ran on the kernel (the child's is its own)
