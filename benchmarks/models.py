"""Checkpoints the benchmarks share: the real tinystories model and a random Qwen2.5-0.5B shape."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINYSTORIES = SHARED / "models" / "tinystories-260k"
CACHE = Path(os.environ.get("FFAI_BENCH_CACHE", Path.home() / ".cache" / "ffai" / "bench"))


def qwen05b_random() -> Path:
    """A random float32 Qwen2.5-0.5B-shaped model (built once with transformers, then cached)."""
    folder = CACHE / "qwen2.5-0.5b-random-f32"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    tmp = folder.with_name(folder.name + ".tmp")
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHARED / "tokenizers" / "qwen2.5" / name, tmp / name)
    tmp.rename(folder)
    return folder


def model_set(names: list[str] | None = None) -> dict[str, Path]:
    table = {"tinystories-260k": lambda: TINYSTORIES, "qwen2.5-0.5b-random": qwen05b_random}
    return {name: table[name]() for name in (names or list(table))}
