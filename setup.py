"""Native code built at install time (Linux only), both parts optional.

1. `ffai_worker/native/_kernels*.so`: the BLAS shim and small-M kernels, a plain shared
   library with no Python entry point, loaded by `ffai_worker/native/blas.py` with ctypes
   (see `ffai_worker/native/kernels/small_gemm.c` for why).
2. `ffai_worker/native/_quant*.so`: MLX custom primitives (`kernels/quant_ops.cpp`,
   `kernels/decode_ops.cpp`) that run the weight-only 4-/8-bit matmul kernel
   (`kernels/quant_gemm.c`) and the decode-step kernels inside MLX graphs, `mx.compile`
   included. Python face: `ffai_worker/native/quant.py`.

How `_quant` is built: setuptools compiles nanobind's single-file library
(`nanobind/src/nb_combined.cpp`, the route nanobind documents for build systems other than
CMake) and the C kernel with their own flags, then the primitive against the headers of
the installed `mlx` wheel, and links them with `libmlx.so`. We chose this over driving
CMake from setuptools because setuptools is already our backend, it needs no `cmake`
binary at install time (one more build requirement and one more process to debug), and
the flags are few and visible here; mlx's own CMake helper (`mlx.extension.CMakeBuild`)
would pull in the same headers and library anyway.

ABI: the module must share nanobind's internals with `mlx.core` so that `mx.array`
passes both ways: same nanobind version (3.1.0, pinned in pyproject.toml), `NB_DOMAIN=mlx`,
and the same libstdc++ ABI (the default `_GLIBCXX_USE_CXX11_ABI=1`). It is also tied to
the exact mlx version whose headers it was built against (pinned for build and run; the
module reports it as `built_for_mlx()` and `quant.py` refuses a mismatch). The runtime
search path `$ORIGIN/../../mlx/lib` finds the wheel's `libmlx.so` from an installed
`ffai_worker/native/`; `quant.py` imports `mlx.core` first, so in an editable install the
already-loaded `libmlx.so` (same soname) satisfies the dependency.

Instruction sets are chosen at run time, so nothing is built with -march and the result
runs on any CPU of the architecture. Without a C/C++ compiler, nanobind or mlx the install
still succeeds: the worker says at start-up which kernels are missing.
"""

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CompileError
except ImportError:  # older setuptools
    from distutils.errors import CompileError

KERNELS = "ffai_worker/native/kernels"
C_FLAGS = [
    "-O3",
    "-std=c11",
    "-ffp-contract=off",  # every tile rounds the same way: batch-invariant rows
    "-fvisibility=hidden",  # export only the cblas_* and ffai_* entry points
    "-pthread",
    "-Wno-psabi",
]
# nanobind's recommended flags for its own sources (see nb_combined.cpp's header).
NB_FLAGS = [
    "-std=c++17",
    "-O2",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-ffunction-sections",
    "-fdata-sections",
    "-DNDEBUG",
    "-DNB_COMPACT_ASSERTIONS",
]

kernels = Extension(
    "ffai_worker.native._kernels",
    sources=[f"{KERNELS}/small_gemm.c"],
    depends=[f"{KERNELS}/small_gemm_tiles.h", f"{KERNELS}/pool.h"],
    extra_compile_args=C_FLAGS,
    extra_link_args=["-pthread"],
    optional=True,
)

quant = Extension(
    "ffai_worker.native._quant",
    sources=[f"{KERNELS}/quant_ops.cpp", f"{KERNELS}/decode_ops.cpp"],
    depends=[
        f"{KERNELS}/ops_common.h",
        f"{KERNELS}/quant_gemm.h",
        f"{KERNELS}/quant_gemm.c",
        f"{KERNELS}/quant_gemm_x86.h",
        f"{KERNELS}/quant_packed_x86.h",
        f"{KERNELS}/act_kernels.h",
        f"{KERNELS}/attn_kernels.h",
        f"{KERNELS}/pool.h",
    ],
    include_dirs=[KERNELS],
    extra_compile_args=[
        "-std=c++20",  # mlx's headers are C++20
        "-O2",
        "-fvisibility=hidden",
        "-DNB_DOMAIN=mlx",  # share nanobind's type registry with mlx.core
        "-DNDEBUG",
        "-DNB_COMPACT_ASSERTIONS",
    ],
    extra_link_args=["-pthread", "-Wl,--gc-sections", "-Wl,--as-needed", "-Wl,-s"],
    runtime_library_dirs=["$ORIGIN/../../mlx/lib"],
    libraries=["mlx"],
    language="c++",
    optional=True,
)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CompileError(f"{name} is not installed in the build environment")
    return Path(next(iter(spec.submodule_search_locations)))


class BuildExt(build_ext):
    """Adds the mlx/nanobind paths and the separately compiled objects to `_quant`."""

    def build_extension(self, ext: Extension) -> None:
        if ext is quant:
            self._prepare_quant(ext)
        super().build_extension(ext)

    def _prepare_quant(self, ext: Extension) -> None:
        mlx_dir, nb_dir = _package_dir("mlx"), _package_dir("nanobind")
        version = importlib.metadata.version("mlx")
        print(f"building {ext.name} against mlx {version} at {mlx_dir}")
        nb_includes = [str(nb_dir / "include"), str(nb_dir / "ext/robin_map/include")]
        tmp = str(Path(self.build_temp) / "quant")
        objects = self.compiler.compile(
            [str(nb_dir / "src/nb_combined.cpp")],
            output_dir=tmp,
            include_dirs=nb_includes,
            extra_postargs=NB_FLAGS,
        )
        objects += self.compiler.compile(
            [f"{KERNELS}/quant_gemm.c"],
            output_dir=tmp,
            include_dirs=[KERNELS],
            extra_postargs=C_FLAGS,
            depends=[
                f"{KERNELS}/quant_gemm.h",
                f"{KERNELS}/quant_gemm_x86.h",
                f"{KERNELS}/quant_packed_x86.h",
                f"{KERNELS}/act_kernels.h",
                f"{KERNELS}/attn_kernels.h",
                f"{KERNELS}/pool.h",
            ],
        )
        ext.extra_objects = objects
        ext.include_dirs = [*ext.include_dirs, *nb_includes, str(mlx_dir / "include")]
        ext.library_dirs = [str(mlx_dir / "lib")]


setup(
    ext_modules=[kernels, quant] if sys.platform == "linux" else [],
    cmdclass={"build_ext": BuildExt},
)
