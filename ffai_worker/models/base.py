"""Pieces every architecture shares: the cache protocol, config parsing, RoPE."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar, runtime_checkable

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@runtime_checkable
class LayerCache(Protocol):
    """What an attention layer needs from its cache.

    `offset` is the position of the first new token: an int when every row of
    the batch is at the same position, or a (B,) int32 array of per-row positions.
    """

    offset: int | mx.array

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store (B, n_kv, L, D) new keys/values; return all (B, n_kv, T, D) to attend to."""
        ...


A = TypeVar("A", bound="BaseModelArgs")


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls: type[A], params: dict[str, Any]) -> A:
        """Build from a config.json dict, ignoring keys this architecture does not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})


def resolve_rope(
    rope_theta: float | None,
    rope_scaling: dict[str, Any] | None,
    rope_parameters: dict[str, Any] | None,
    default_theta: float = 10000.0,
) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config generation.

    transformers 4 writes `rope_theta` + `rope_scaling`; transformers 5 writes
    `rope_parameters` holding `rope_theta`, `rope_type` and the scaling keys.
    The explicit older keys win where both are present.
    """
    params = rope_parameters or {}
    theta = rope_theta if rope_theta is not None else params.get("rope_theta", default_theta)
    scaling = rope_scaling
    if scaling is None and rope_type(params) != "default":
        scaling = params
    return float(theta), scaling


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


# "dynamic" (NTK) equals "default" up to max_position_embeddings, and the
# engine never goes past that (it is the context length it reports).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def llama3_inv_freq(dims: int, base: float, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1 frequency smoothing, op for op as transformers' _compute_llama3_parameters."""
    inv_freq = 1.0 / (np.float32(base) ** (np.arange(0, dims, 2).astype(np.float32) / dims))
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    # Boundaries count as medium, as in transformers (mlx-lm uses strict bounds).
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


class RoPE(nn.Module):
    """Non-interleaved rotary embedding (HF's rotate_half layout)."""

    def __init__(self, dims: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        kind = rope_type(scaling)
        if kind not in SUPPORTED_ROPE_TYPES:
            supported = ", ".join(SUPPORTED_ROPE_TYPES)
            raise ValueError(f"rope type {kind!r} is not supported (supported: {supported})")
        self.dims = dims
        self._base: float | None = base
        self._scale = 1.0
        self._freqs: mx.array | None = None  # underscore: not a parameter
        if kind == "linear":
            self._scale = 1.0 / float(scaling["factor"])  # type: ignore[index]
        elif kind == "llama3":
            # mx.fast.rope takes periods (1 / inverse frequency), not frequencies.
            self._freqs = mx.array(1.0 / llama3_inv_freq(dims, base, scaling))  # type: ignore[arg-type]
            self._base = None

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self._base,
            scale=self._scale,
            offset=offset,
            freqs=self._freqs,
        )
