"""The model contract: everything the engine, decoder, prefill and loader may use on a model.

Code outside `ffai_worker/models/` touches a model only through `CausalLM`
(plus the `mlx.nn.Module` methods the loader needs: `load_weights`,
`set_dtype`, `eval`, `parameters`). Adding an architecture is one module that
satisfies `Architecture` plus one line in `ffai_worker.models.ARCHITECTURES`.

Caches. A model runs over any list of per-layer `LayerCache`s: the engine
hands it views into its slotted cache, tests use `model.make_cache()`. Every
cache stores a sequence from position 0, so a layer can derive its query
positions (`cache.offset` + 0..L-1, `offset` an int or a per-row (B,) array)
and its key positions (0..T-1 of what `update_and_fetch` returns).

Masks. `mask` is None (one new token per row, nothing to hide), "causal"
(queries are the last L of the T positions), or an additive array
broadcastable to (B, 1, L, T) that the caller built (the batched decoder
hides each row's positions past its own length). Sliding-window layers
narrow whichever mask they get to their window themselves, so callers never
need to know a model's layer types.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from ffai_worker.models.base import FULL_ATTENTION, SLIDING_ATTENTION, LayerCache

LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)


@runtime_checkable
class CausalLM(Protocol):
    """A loaded causal language model, as the rest of the worker sees it."""

    model_type: str  # config.json's model_type

    @property
    def num_layers(self) -> int:
        """Transformer layers, i.e. caches per sequence."""
        ...

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (the same in every layer)."""
        ...

    @property
    def head_dim(self) -> int:
        """Width of one key or value head."""
        ...

    @property
    def cache_dtype(self) -> mx.Dtype:
        """The dtype keys and values are computed in (what a KV cache should hold)."""
        ...

    @property
    def layer_types(self) -> list[str]:
        """Per layer, FULL_ATTENTION or SLIDING_ATTENTION (which attends `sliding_window`)."""
        ...

    @property
    def sliding_window(self) -> int | None:
        """Positions a sliding layer attends (its own included); None if it has none."""
        ...

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        mask: mx.array | str | None = None,
        *,
        last_only: bool = False,
    ) -> mx.array:
        """Token ids (B, L) -> logits (B, L, vocab), or (B, 1, vocab) with `last_only`."""
        ...

    def hidden_states(
        self, inputs: mx.array, cache: list[Any] | None = None, mask: mx.array | str | None = None
    ) -> mx.array:
        """Token ids (B, L) -> final-norm hidden states (B, L, D), for `logits` on chosen rows."""
        ...

    def logits(self, h: mx.array) -> mx.array:
        """Final-norm hidden states (B, L, D) -> logits (B, L, vocab)."""
        ...

    def make_cache(self) -> list[LayerCache]:
        """Fresh single-sequence caches, one per layer."""
        ...

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors renamed, dropped or transformed to fit this model's parameters."""
        ...


class Architecture(Protocol):
    """What one architecture module (e.g. `ffai_worker.models.gemma2`) provides."""

    __name__: str
    ModelArgs: Any  # a BaseModelArgs dataclass: `ModelArgs.from_dict(config)` may raise ValueError
    Model: Any  # `Model(args)` builds an uninitialized CausalLM


__all__ = [
    "FULL_ATTENTION",
    "LAYER_TYPES",
    "SLIDING_ATTENTION",
    "Architecture",
    "CausalLM",
    "LayerCache",
]
