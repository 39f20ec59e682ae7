"""Qwen3 (dense): the Llama block with RMS norms on queries and keys, per head, before RoPE."""

from __future__ import annotations

from dataclasses import dataclass

from ffai_worker.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    head_dim: int | None = 128  # transformers' Qwen3Config default, not hidden / heads
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None

    @property
    def qk_norm(self) -> bool:
        return True


class Model(llama.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
