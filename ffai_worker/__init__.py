"""FFAI worker: one process that keeps a model loaded and serves many clients.

Importing this package first preloads a fast BLAS (OpenBLAS) for MLX's CPU backend
(see `ffai_worker.blas`); import `ffai_worker` before `mlx` everywhere.
"""

from ffai_worker.blas import blas_info, preload_blas

preload_blas()

__all__ = ["blas_info"]
