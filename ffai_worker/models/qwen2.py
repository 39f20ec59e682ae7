"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (not o)."""

from __future__ import annotations

from dataclasses import dataclass

from ffai_worker.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None  # Qwen2 configs carry a window size they do not use

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False


class Model(llama.Model):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
