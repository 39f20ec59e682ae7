"""Llama family: Llama 2 / 3.x, Mistral, SmolLM, TinyStories (and the base of Qwen2/3).

Attribute names follow the checkpoint keys (model.layers.N.self_attn.q_proj, ...),
so weights load with no renaming table.

Decode on a CPU is memory-bound. Fusing float q/k/v and gate/up into single
matmuls was measured and did not help, so projections stay as in the checkpoint;
on the native quantized kernel, where a product's fixed cost is a larger share, they
are fused at load (`quantized.fuse_siblings`) and called through `project`.
`last_only=True` in prefill skips all but one row of the vocab projection
(figures: benchmarks/NOTES.md).
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
    window_mask,
)
from ffai_worker.models.cpu_ops import RMSNorm, gated_down, scaled_dot_product_attention
from ffai_worker.models.quantized import project, project_columns


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    head_dim: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        self.rope_theta, self.rope_scaling = resolve_rope(
            self.rope_theta, self.rope_scaling, self.rope_parameters
        )
        if self.model_type == "llama":
            self.sliding_window = None  # transformers' Llama has no windowed attention
        self.layer_types = checked_layer_types(
            self.attention_kinds(),
            self.num_hidden_layers,
            self.sliding_window,
            self.max_position_embeddings,
        )

    def attention_kinds(self) -> list[str]:
        """Mistral: every layer windowed when a window is set (config layer_types ignored)."""
        kind = SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION
        return [kind] * self.num_hidden_layers

    # Per-architecture switches; Qwen2/Qwen3 args override them.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return False


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None = None) -> None:
        super().__init__()
        self.window = window  # None: attends every earlier position
        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = int(args.num_key_value_heads or n_heads)
        self.head_dim = head_dim = int(args.head_dim or dim // n_heads)
        self.scale = head_dim**-0.5

        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=args.o_bias)
        self.use_qk_norm = args.qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(
            head_dim,
            float(args.rope_theta or 10000.0),
            args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
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
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(0, 2, 1, 3)  # (B, H, L, Dh)
        k = k.transpose(0, 2, 1, 3)  # (B, Hkv, L, Dh)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, Hkv, T, Dh)
        mask = window_mask(mask, offset, L, k.shape[2], self.window, q.dtype)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return gated_down(x, self.gate_proj, self.up_proj, self.down_proj)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str = FULL_ATTENTION) -> None:
        super().__init__()
        window = args.sliding_window if layer_type == SLIDING_ATTENTION else None
        self.self_attn = Attention(args, window)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: LayerCache | None
    ) -> mx.array:
        h, update = self.residual_call(x, None, mask, cache)
        return h + update

    def residual_call(
        self,
        stream: mx.array,
        update: mx.array | None,
        mask: mx.array | str | None,
        cache: LayerCache | None,
    ) -> tuple[mx.array, mx.array]:
        """This block on the residual stream `stream + update` (just `stream` when update
        is None), returned the same way: each residual add goes into the norm after it
        (`RMSNorm.add`, one node where two were); the caller adds the last update."""
        if update is None:
            h, normed = stream, self.input_layernorm(stream)
        else:
            h, normed = self.input_layernorm.add(stream, update)
        h, normed = self.post_attention_layernorm.add(h, self.self_attn(normed, mask, cache))
        return h, self.mlp(normed)


class LlamaModel(nn.Module):
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
            mask = "causal"  # mx.fast SDPA aligns it to the last T positions
        caches = cache if cache is not None else [None] * len(self.layers)
        update = None  # each block's output, added inside the next norm
        for layer, c in zip(self.layers, caches, strict=True):
            h, update = layer.residual_call(h, update, mask, c)
        return self.norm(h) if update is None else self.norm.add(h, update)[1]


class Model(CausalLMBase):
    """Causal LM: token ids (B, L) -> logits (B, L, vocab); the contract is in CausalLMBase."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
