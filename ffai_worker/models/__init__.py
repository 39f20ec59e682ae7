"""Architectures by config `model_type`: one mlx-lm-shaped module each (ModelArgs, Model).

Every Model satisfies `contract.CausalLM`; adding an architecture is one
module plus one line in ARCHITECTURES.
"""

from __future__ import annotations

from ffai_worker.models import gemma2, gemma3_text, llama, phi3, qwen2, qwen3
from ffai_worker.models.base import LayerCache
from ffai_worker.models.contract import Architecture, CausalLM

ARCHITECTURES: dict[str, Architecture] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "phi3": phi3,
    "gemma2": gemma2,
    "gemma3_text": gemma3_text,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)


def get_architecture(model_type: str) -> Architecture | None:
    """The module for a config's `model_type`, or None when unsupported."""
    return ARCHITECTURES.get(model_type)


__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "CausalLM",
    "LayerCache",
    "get_architecture",
]
