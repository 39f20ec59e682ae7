"""A single-sequence KV cache for tests and one-off generation (the engine has its own).

`model.make_cache()` returns one per layer.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Growable (B, n_kv, T, D) key/value buffers for one layer, `step` positions at a time."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or self.values is None or prev + n > self.keys.shape[2]:
            self._grow(keys, values, prev + n)
        assert self.keys is not None and self.values is not None
        self.offset = prev + n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, n_kv, _, k_dim = keys.shape
        capacity = -(-needed // self.step) * self.step  # round up to a whole step
        new_k = mx.zeros((B, n_kv, capacity, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.values is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes
