"""FFAI worker: one process that keeps a model loaded and serves many clients.

Importing this package first preloads a fast BLAS (OpenBLAS) for MLX's CPU backend
(see `ffai_worker.native.blas`); import `ffai_worker` before `mlx` everywhere.
`Engine` and its boundary types load lazily, so `from ffai_worker import Engine`
still swaps the BLAS in before MLX loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ffai_worker.native.blas import blas_info, preload_blas

preload_blas()

if TYPE_CHECKING:
    from ffai_worker.engine import Engine, EngineConfig, StepFailed
    from ffai_worker.engine.types import EngineLoad, RequestKey, StepOutput

_LAZY = {
    "Engine": "ffai_worker.engine",
    "EngineConfig": "ffai_worker.engine",
    "StepFailed": "ffai_worker.engine",
    "EngineLoad": "ffai_worker.engine.types",
    "RequestKey": "ffai_worker.engine.types",
    "StepOutput": "ffai_worker.engine.types",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineLoad",
    "RequestKey",
    "StepFailed",
    "StepOutput",
    "blas_info",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ffai_worker' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value
