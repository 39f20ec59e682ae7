"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (not o)."""

from __future__ import annotations

from dataclasses import dataclass

from ffai_worker.models import llama
from ffai_worker.models.base import FULL_ATTENTION, SLIDING_ATTENTION


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    max_window_layers: int | None = 28  # transformers' default

    def __post_init__(self) -> None:
        if not self.use_sliding_window:
            self.sliding_window = None  # Qwen configs carry a window size they do not use
        super().__post_init__()

    def attention_kinds(self) -> list[str]:
        """transformers: the config's layer_types, else windowed from layer max_window_layers on."""
        if self.layer_types is not None:
            return list(self.layer_types)
        first = self.max_window_layers or 0
        return [
            SLIDING_ATTENTION if self.sliding_window and i >= first else FULL_ATTENTION
            for i in range(self.num_hidden_layers)
        ]

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False


class Model(llama.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
