"""Architectures by config `model_type`, each an mlx-lm-shaped module with ModelArgs and Model."""

from __future__ import annotations

from types import ModuleType

from ffai_worker.models import llama, qwen2, qwen3
from ffai_worker.models.base import LayerCache
from ffai_worker.models.llama import Model

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)


def get_architecture(model_type: str) -> ModuleType | None:
    """The module for a config's `model_type`, or None when unsupported."""
    return ARCHITECTURES.get(model_type)


__all__ = ["ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "LayerCache", "Model", "get_architecture"]
