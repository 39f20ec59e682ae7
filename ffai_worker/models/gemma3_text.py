"""Gemma 3 text models (`gemma3_text`: Gemma 3 1B, and the text stack of the larger ones).

The Gemma 2 block (see gemma2.py) with, as in transformers' modeling_gemma3.py:
- RMS norms (Gemma's 1 + weight) on queries and keys, per head, before RoPE;
- a local/global pattern: every `sliding_window_pattern`-th layer global, the
  rest sliding-window (or the config's `layer_types`);
- a RoPE per layer type: local layers use `rope_local_base_freq` unscaled,
  global layers `rope_theta` with the config's scaling (e.g. linear x8);
- no soft-capping unless the config sets it.
Configs come in two generations: transformers 4 writes `rope_theta`,
`rope_local_base_freq` and `rope_scaling`; transformers 5 writes
`rope_parameters` = {"full_attention": {...}, "sliding_attention": {...}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ffai_worker.models import gemma2
from ffai_worker.models.base import FULL_ATTENTION, SLIDING_ATTENTION, resolve_rope

DEFAULT_THETA = {FULL_ATTENTION: 1_000_000.0, SLIDING_ATTENTION: 10_000.0}


@dataclass
class ModelArgs(gemma2.ModelArgs):
    max_position_embeddings: int = 131072
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None
    sliding_window_pattern: int = 6

    def default_layer_types(self) -> list[str]:
        """Every sliding_window_pattern-th layer global (1B: 5 local, then 1 global)."""
        pattern = self.sliding_window_pattern
        return [
            SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
            for i in range(self.num_hidden_layers)
        ]

    def rope_for(self, layer_type: str) -> tuple[float, dict[str, Any] | None]:
        default = DEFAULT_THETA[layer_type]
        nested = self.rope_parameters or {}
        if isinstance(nested.get(layer_type), dict):  # transformers 5
            return resolve_rope(None, None, nested[layer_type], default)
        if layer_type == SLIDING_ATTENTION:
            return float(self.rope_local_base_freq or default), None
        return resolve_rope(self.rope_theta, self.rope_scaling, self.rope_parameters, default)

    @property
    def qk_norm(self) -> bool:
        return True


class Model(gemma2.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
