"""The native BLAS shim and small-M kernels, built at install time (Linux only).

`ffai_worker/native/_kernels*.so` is a plain shared library built by setuptools: it has no
Python entry point and is never imported; `ffai_worker/native/blas.py` loads it with ctypes
(see `ffai_worker/native/kernels/small_gemm.c` for why). Instruction sets are chosen at run
time, so the build uses no -march flag and the result runs on any CPU of the
architecture. Optional: without a C compiler the install still succeeds and the
worker says at start-up that the kernels are missing.
"""

import sys

from setuptools import Extension, setup

kernels = Extension(
    "ffai_worker.native._kernels",
    sources=["ffai_worker/native/kernels/small_gemm.c"],
    depends=["ffai_worker/native/kernels/small_gemm_tiles.h", "ffai_worker/native/kernels/pool.h"],
    extra_compile_args=[
        "-O3",
        "-std=c11",
        "-ffp-contract=off",  # every tile rounds the same way: batch-invariant rows
        "-fvisibility=hidden",  # export only the cblas_* and ffai_* entry points
        "-pthread",
        "-Wno-psabi",
    ],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[kernels] if sys.platform == "linux" else [])
