"""Gemma 2 (and the pieces Gemma 3 text models share), as in transformers' modeling_gemma2.py.

Differences from Llama:
- RMSNorm scales by (1 + weight), and every block has four of them: before
  and after attention, before and after the MLP;
- embeddings are multiplied by sqrt(hidden_size) (in the embedding's dtype);
- attention scales by query_pre_attn_scalar**-0.5, not head_dim**-0.5;
- attention scores and final logits are soft-capped: cap * tanh(x / cap);
- layers alternate sliding-window (even indices) and global attention, or
  follow the config's `layer_types`;
- the MLP gate is GELU (tanh approximation), and embeddings are tied.
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
    attention,
    checked_layer_types,
    decode_attention,
    fused_decode,
    resolve_rope,
    window_mask,
)
from ffai_worker.models.cpu_ops import rms_norm
from ffai_worker.models.quantized import project, project_columns

# transformers' ACT2FN names of the activations Gemma configs use.
ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    head_dim: int = 256
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    hidden_activation: str | None = "gelu_pytorch_tanh"
    hidden_act: str | None = None  # older configs' name for hidden_activation
    query_pre_attn_scalar: float = 256
    attention_bias: bool = False
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    use_bidirectional_attention: bool | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        activation = self.hidden_activation or self.hidden_act or "gelu_pytorch_tanh"
        if activation not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {activation!r} is not supported")
        self.hidden_activation = activation
        if self.use_bidirectional_attention:
            raise ValueError("bidirectional attention (an embedding model) is not supported")
        self.layer_types = checked_layer_types(
            self.layer_types or self.default_layer_types(),
            self.num_hidden_layers,
            self.sliding_window,
            self.max_position_embeddings,
        )

    def default_layer_types(self) -> list[str]:
        """Gemma 2: sliding, global, sliding, global, ..."""
        return [
            SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION
            for i in range(self.num_hidden_layers)
        ]

    def rope_for(self, layer_type: str) -> tuple[float, dict[str, Any] | None]:
        """(theta, scaling) of one layer type: Gemma 2 uses one RoPE everywhere."""
        return resolve_rope(self.rope_theta, self.rope_scaling, self.rope_parameters)

    @property
    def qk_norm(self) -> bool:
        return False


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: weights stored as an offset from 1."""

    def __init__(self, dims: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        dim = args.hidden_size
        self.window = args.sliding_window if layer_type == SLIDING_ATTENTION else None
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = int(args.num_key_value_heads or n_heads)
        self.head_dim = head_dim = args.head_dim
        self.scale = float(args.query_pre_attn_scalar) ** -0.5
        self.softcap = args.attn_logit_softcapping
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.use_qk_norm = args.qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        theta, scaling = args.rope_for(layer_type)
        self.rope = RoPE(
            head_dim, theta, scaling, max_position_embeddings=args.max_position_embeddings
        )

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: LayerCache | None
    ) -> mx.array:
        B, L, _ = x.shape  # (B, L, D)
        if fused_decode(cache, x):  # RoPE, KV write and attention in native nodes
            q_, k_, v_ = project_columns(x, self.q_proj, self.k_proj, self.v_proj)
            return self.o_proj(decode_attention(self, cache, q_, k_, v_))  # (B, 1, D)
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)  # one product if fused
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)  # (B, H, L, Dh)
        k = self.rope(k.transpose(0, 2, 1, 3), offset=offset)  # (B, Hkv, L, Dh)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, T, Dh)
        mask = window_mask(mask, offset, L, k.shape[2], self.window, q.dtype)
        out = attention(q, k, v, scale=self.scale, mask=mask, offset=offset, softcap=self.softcap)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[str(args.hidden_activation)]

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_type)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: LayerCache | None
    ) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_scale = args.hidden_size**0.5
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
        h = h * mx.array(self.embed_scale, dtype=h.dtype)  # transformers rounds it to the dtype
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
        self.model = GemmaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, h: mx.array) -> mx.array:
        logits = super().logits(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap
