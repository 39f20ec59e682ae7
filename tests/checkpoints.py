"""Tiny random checkpoints written by transformers, for tests (no network).

Every builder writes an HF-layout folder (config.json, *.safetensors,
generation_config.json) and returns its path; `load_reference(path)` reads it
back as a transformers model to use as the oracle. Weights are drawn with a
larger initializer_range than transformers' default (0.02) so attention is far
from uniform and a wrong RoPE or mask shows in the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SLIDING_WINDOW = 12  # windowed test models: prompts of 5-65 tokens run past it

LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def build_checkpoint(
    model_type: str,
    path: str | Path,
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    initializer_range: float = 0.1,
    max_shard_size: str | int | None = None,
    **config: Any,
) -> Path:
    """Write a random checkpoint of a transformers `model_type` ("llama", "gemma2", ...) to `path`.

    Extra keyword arguments go into the transformers config (e.g. rope_scaling,
    attention_bias, rope_theta). `max_shard_size` (e.g. "100KB") forces sharding.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        head_dim=head_dim or hidden_size // num_attention_heads,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        **config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize_extras(model, initializer_range)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


def _randomize_extras(model: Any, std: float) -> None:
    """transformers starts biases at 0 and norm weights at 1; make both random so they count."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif "norm" in name:
                param.normal_(1.0, std)


def build_llama(path: str | Path, **kw: Any) -> Path:
    return build_checkpoint("llama", path, **kw)


def build_llama3_scaled(path: str | Path, **kw: Any) -> Path:
    """Llama with Llama 3.1 rope scaling; original context 32 so test prompts exceed it."""
    kw.setdefault("rope_scaling", dict(LLAMA3_ROPE_SCALING))
    kw.setdefault("rope_theta", 10000.0)
    return build_checkpoint("llama", path, **kw)


def build_mistral(path: str | Path, **kw: Any) -> Path:
    """Every layer windowed; a small window so test prompts and outputs run past it."""
    kw.setdefault("sliding_window", SLIDING_WINDOW)
    return build_checkpoint("mistral", path, **kw)


def build_qwen2(path: str | Path, **kw: Any) -> Path:
    return build_checkpoint("qwen2", path, **kw)


def build_qwen3(path: str | Path, **kw: Any) -> Path:
    return build_checkpoint("qwen3", path, **kw)


# LongRoPE factors for the first 6 of 16 head features (partial_rotary_factor 0.75, as Phi-4-mini).
PHI3_SHORT_FACTOR = [1.0, 1.05, 1.1, 1.2, 1.3, 1.5]
PHI3_LONG_FACTOR = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]


def build_phi3(
    path: str | Path,
    *,
    original_max_position_embeddings: int = 1,
    attention_factor: float | None = 1.2,
    **kw: Any,
) -> Path:
    """Phi-3 with LongRoPE and a sliding window.

    transformers takes the long factors only in forward passes reaching past
    original_max_position_embeddings (we always do, see base.longrope_periods),
    so 1 makes every test prompt long; its default attention factor divides
    by log(original), hence an explicit one here.
    """
    rope: dict[str, Any] = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": PHI3_SHORT_FACTOR,
        "long_factor": PHI3_LONG_FACTOR,
        "original_max_position_embeddings": original_max_position_embeddings,
    }
    if attention_factor is not None:
        rope["attention_factor"] = attention_factor
    kw.setdefault("rope_scaling", rope)
    kw.setdefault("partial_rotary_factor", 0.75)
    kw.setdefault("pad_token_id", 0)  # transformers defaults to 32000, outside a tiny vocab
    kw.setdefault("sliding_window", SLIDING_WINDOW)
    return build_checkpoint(
        "phi3", path, original_max_position_embeddings=original_max_position_embeddings, **kw
    )


def build_gemma2(path: str | Path, **kw: Any) -> Path:
    """Gemma 2: caps low enough to bend the scores and logits, a window, a distinct query scale."""
    kw.setdefault("sliding_window", SLIDING_WINDOW)
    kw.setdefault("attn_logit_softcapping", 2.0)
    kw.setdefault("final_logit_softcapping", 3.0)
    kw.setdefault("query_pre_attn_scalar", 24)
    kw.setdefault("tie_word_embeddings", True)
    return build_checkpoint("gemma2", path, **kw)


def build_gemma3_text(path: str | Path, **kw: Any) -> Path:
    """Gemma 3: local, global layers; distinct local and (linearly scaled) global RoPE."""
    kw.setdefault("sliding_window", SLIDING_WINDOW)
    kw.setdefault("sliding_window_pattern", 2)
    kw.setdefault("rope_theta", 1_000_000.0)
    kw.setdefault("rope_local_base_freq", 100.0)
    kw.setdefault("rope_scaling", {"rope_type": "linear", "factor": 2.0})
    kw.setdefault("query_pre_attn_scalar", 24)
    kw.setdefault("tie_word_embeddings", True)
    return build_checkpoint("gemma3_text", path, **kw)


BUILDERS = {
    "llama": build_llama,
    "llama3_scaled": build_llama3_scaled,
    "mistral": build_mistral,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "phi3": build_phi3,
    "gemma2": build_gemma2,
    "gemma3_text": build_gemma3_text,
}


def load_reference(path: str | Path) -> Any:
    """The checkpoint as a float32 transformers model in eval mode (the oracle).

    Eager attention: the reference implementation of masks, windows and soft-capping.
    """
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        Path(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def greedy_reference(model: Any, prompt: list[int], n: int) -> list[int]:
    """`n` greedy ids from a transformers model: manual loop, no EOS stop, KV cache reused."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        result = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(
                torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True
            )
    return out


def greedy_ours(model: Any, prompt: list[int], n: int) -> list[int]:
    """`n` greedy ids from an ffai_worker model: prefill, then one token at a time on KVCache."""
    import mlx.core as mx

    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache, last_only=True)
    out: list[int] = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out
