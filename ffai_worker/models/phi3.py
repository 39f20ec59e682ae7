"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with fused projections and LongRoPE.

Differences from Llama, as in transformers' modeling_phi3.py:
- one `qkv_proj` (queries, then keys, then values) and one `gate_up_proj`
  (gate, then up) instead of separate projections;
- `partial_rotary_factor` (Phi-4-mini: 0.75) rotates only the first features;
- LongRoPE (`rope_type` "longrope", formerly "su"): per-frequency short/long
  factors and an attention factor on cos/sin (see base.longrope_periods);
- a `sliding_window`, when set below the context, windows every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ffai_worker.models.base import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    BaseModelArgs,
    CausalLMBase,
    LayerCache,
    RoPE,
    checked_layer_types,
    decode_attention,
    fused_decode,
    resolve_rope,
    rope_type,
    window_mask,
)
from ffai_worker.models.cpu_ops import RMSNorm, scaled_dot_product_attention, silu_mul


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = None
    hidden_act: str = "silu"
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    partial_rotary_factor: float | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        params = self.rope_parameters or {}
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = float(params.get("partial_rotary_factor", 1.0))
        self.rope_theta, self.rope_scaling = resolve_rope(
            self.rope_theta, self.rope_scaling, self.rope_parameters
        )
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if rope_type(scaling) in ("su", "yarn"):  # transformers reads both as longrope
                scaling["rope_type"] = "longrope"
            if self.original_max_position_embeddings is not None:
                scaling.setdefault(
                    "original_max_position_embeddings", self.original_max_position_embeddings
                )
            self.rope_scaling = scaling
        kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
        self.layer_types = checked_layer_types(
            [kind] * self.num_hidden_layers,
            self.num_hidden_layers,
            self.sliding_window,
            self.max_position_embeddings,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None) -> None:
        super().__init__()
        dim = args.hidden_size
        self.window = window
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = int(args.num_key_value_heads or n_heads)
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        op_size = (n_heads + 2 * n_kv_heads) * head_dim
        self.qkv_proj = nn.Linear(dim, op_size, bias=False)  # (D) -> (q | k | v)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.rope = RoPE(
            int(head_dim * float(args.partial_rotary_factor or 1.0)),
            float(args.rope_theta or 10000.0),
            args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: LayerCache | None
    ) -> mx.array:
        B, L, _ = x.shape  # (B, L, D)
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)  # (B, L, (H + 2 Hkv) Dh)
        if fused_decode(cache, x):  # RoPE, KV write and attention in native nodes
            kv_width = k_end - q_end
            q_, k_, v_ = (qkv, 0, q_end), (qkv, q_end, kv_width), (qkv, k_end, kv_width)
            return self.o_proj(decode_attention(self, cache, q_, k_, v_))  # (B, 1, D)
        q = qkv[..., :q_end].reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = qkv[..., q_end:k_end].reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = qkv[..., k_end:].reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)  # (B, H, L, Dh)
        k = self.rope(k, offset=offset)  # (B, Hkv, L, Dh)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, T, Dh)
        mask = window_mask(mask, offset, L, k.shape[2], self.window, q.dtype)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)  # (D) -> (gate | up)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(silu_mul(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        window = args.sliding_window if layer_type == SLIDING_ATTENTION else None
        self.self_attn = Attention(args, window)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: LayerCache | None
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, kind) for kind in args.layer_types or []]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        mask: mx.array | str | None = None,
    ) -> mx.array:
        h = self.embed_tokens(inputs)  # (B, L, D)
        if mask is None and inputs.shape[1] > 1:
            mask = "causal"
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, caches, strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(CausalLMBase):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Phi3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
