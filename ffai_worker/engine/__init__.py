"""The engine core: a socket-free `Engine` and the parts of its step loop.

`core` (the Engine), `scheduler` (plans a step; no MLX), `runner` (executes a
plan), `sequence`, `timings`, `types` (the engine's boundary types), and the
MLX pieces the runner drives: `kv_cache`, `decoder`, `prefill`, `sampling`.
`Engine`, `EngineConfig` and `StepFailed` load lazily, so importing the
scheduler alone never loads MLX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ffai_worker.engine.core import Engine, EngineConfig, StepFailed

__all__ = ["Engine", "EngineConfig", "StepFailed"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'ffai_worker.engine' has no attribute {name!r}")
    from ffai_worker.engine import core

    value = getattr(core, name)
    globals()[name] = value
    return value
