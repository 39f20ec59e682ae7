"""Pieces every architecture shares: the cache protocol, config parsing, RoPE, masks, attention.

`CausalLMBase` implements the model contract (`contract.CausalLM`) for models
laid out as `self.model` = (embed_tokens, layers, norm) plus an optional
`lm_head`, which every architecture here is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar, runtime_checkable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ffai_worker.models.cpu_ops import scaled_dot_product_attention, step_memo


@runtime_checkable
class LayerCache(Protocol):
    """What an attention layer needs from its cache.

    `offset` is the position of the first new token: an int when every row of
    the batch is at the same position, or a (B,) int32 array of per-row positions.
    """

    @property
    def offset(self) -> int | mx.array: ...

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store (B, n_kv, L, D) new keys/values; return all (B, n_kv, T, D) to attend to."""
        ...


A = TypeVar("A", bound="BaseModelArgs")


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls: type[A], params: dict[str, Any]) -> A:
        """Build from a config.json dict, ignoring keys this architecture does not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})


def resolve_rope(
    rope_theta: float | None,
    rope_scaling: dict[str, Any] | None,
    rope_parameters: dict[str, Any] | None,
    default_theta: float = 10000.0,
) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config generation.

    transformers 4 writes `rope_theta` + `rope_scaling`; transformers 5 writes
    `rope_parameters` holding `rope_theta`, `rope_type` and the scaling keys.
    The explicit older keys win where both are present.
    """
    params = rope_parameters or {}
    theta = rope_theta if rope_theta is not None else params.get("rope_theta", default_theta)
    scaling = rope_scaling
    if scaling is None and rope_type(params) != "default":
        scaling = params
    return float(theta), scaling


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


# "dynamic" (NTK) equals "default" up to max_position_embeddings, and the
# engine never goes past that (it is the context length it reports).
# "su" is LongRoPE's name in the first Phi-3 configs.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "su")


def llama3_inv_freq(dims: int, base: float, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1 frequency smoothing, op for op as transformers' _compute_llama3_parameters."""
    inv_freq = 1.0 / (np.float32(base) ** (np.arange(0, dims, 2).astype(np.float32) / dims))
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    # Boundaries count as medium, as in transformers (mlx-lm uses strict bounds).
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def longrope_periods(
    dims: int, base: float, scaling: dict[str, Any], max_position_embeddings: int | None
) -> tuple[np.ndarray, float]:
    """(periods, attention factor) of LongRoPE (Phi-3.5, Phi-4-mini), as transformers computes them.

    transformers picks the long or short factors per forward pass, by the
    longest position in it, which a KV cache cannot follow (keys cached with
    short factors would meet queries rotated with long ones). Like vLLM and
    mlx-lm we pick once: the long factors whenever the context we serve
    (max_position_embeddings) exceeds the original one. That equals
    transformers for prompts longer than original_max_position_embeddings.
    """
    missing = {"short_factor", "long_factor", "original_max_position_embeddings"} - set(scaling)
    if missing:
        raise ValueError(f"longrope rope scaling lacks {', '.join(sorted(missing))}")
    original = int(scaling["original_max_position_embeddings"])
    served = int(max_position_embeddings or original)
    factor = scaling.get("factor") or served / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0
        if factor > 1.0:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    ext = scaling["long_factor"] if served > original else scaling["short_factor"]
    if len(ext) != dims // 2:
        raise ValueError(f"longrope factors have {len(ext)} entries, {dims // 2} expected")
    exponents = np.arange(0, dims, 2).astype(np.float32) / dims
    periods = np.array(ext, dtype=np.float32) * (np.float32(base) ** exponents)
    return periods.astype(np.float32), float(attention_factor)


class RoPE(nn.Module):
    """Non-interleaved rotary embedding (HF's rotate_half layout) of the first `dims` features."""

    def __init__(
        self,
        dims: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        *,
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        kind = rope_type(scaling)
        if kind not in SUPPORTED_ROPE_TYPES:
            supported = ", ".join(SUPPORTED_ROPE_TYPES)
            raise ValueError(f"rope type {kind!r} is not supported (supported: {supported})")
        self.dims = dims
        self._base: float | None = base
        self._scale = 1.0
        self._mscale = 1.0  # LongRoPE's attention factor on the rotated features
        self._freqs: mx.array | None = None  # underscore: not a parameter
        if kind == "linear":
            self._scale = 1.0 / float(scaling["factor"])  # type: ignore[index]
        elif kind == "llama3":
            # mx.fast.rope takes periods (1 / inverse frequency), not frequencies.
            self._freqs = mx.array(1.0 / llama3_inv_freq(dims, base, scaling))  # type: ignore[arg-type]
            self._base = None
        elif kind in ("longrope", "su"):
            assert scaling is not None
            periods, self._mscale = longrope_periods(dims, base, scaling, max_position_embeddings)
            self._freqs = mx.array(periods)
            self._base = None
        half = dims // 2
        if self._freqs is not None:
            self._inverse = 1.0 / self._freqs
            freqs_key: tuple[float, ...] | None = tuple(self._freqs.tolist())
        else:  # as mx.fast.rope's CPU fallback computes them, to the bit
            step = mx.array(-math.log(base) / half, dtype=mx.float32)
            self._inverse = mx.exp(mx.arange(half, dtype=mx.float32) * step)
            freqs_key = None
        mx.eval(self._inverse)
        # Layers whose RoPE is the same share one set of tables per step.
        self._table_key = (dims, self._base, self._scale, freqs_key)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self._mscale != 1.0:
            # transformers scales cos and sin, i.e. only the rotated features.
            d = self.dims
            if x.shape[-1] == d:
                x = x * self._mscale
            else:
                x = mx.concatenate([x[..., :d] * self._mscale, x[..., d:]], axis=-1)
        memo = step_memo()
        if memo is not None and isinstance(offset, mx.array) and x.shape[-1] == self.dims:
            return self._rotate(x, offset, memo)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self._base,
            scale=self._scale,
            offset=offset,
            freqs=self._freqs,
        )

    def native_params(self) -> dict[str, Any]:
        """This RoPE as `decode_attention` takes it (attn_kernels.h: same angles, float32)."""
        return {
            "inv_freq": self._inverse,
            "rope_scale": self._scale,
            "rope_mscale": self._mscale,
        }

    def _rotate(self, x: mx.array, offset: mx.array, memo: dict[Any, Any]) -> mx.array:
        """mx.fast.rope for (B,) offsets inside `cpu_decode_step`, as one fused kernel.

        The arithmetic is the CPU fallback's (same frequencies, same products), so the
        results are equal; but cos/sin come from `memo`, made once for every layer.
        """
        B, H, L, D = x.shape
        key = (id(offset), L, self._table_key)
        entry = memo.get(key)
        if entry is None:  # the entry holds `offset` too, so its id is not reused meanwhile
            entry = memo[key] = (offset, *self._tables(offset, L))
        _, c, s = entry
        x5 = x.reshape(B, H, L, 2, D // 2)  # the two halves rotate_half swaps
        out = x5 * c + x5[..., ::-1, :] * s
        return out.reshape(B, H, L, D).astype(x.dtype)

    def _tables(self, offset: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """(cos, cos) and (-sin, sin) for rows at positions offset..offset+length-1."""
        pos = offset.astype(mx.float32)[:, None] + mx.arange(length, dtype=mx.float32)  # (B, L)
        if self._scale != 1.0:
            pos = pos * self._scale
        theta = pos[..., None] * self._inverse  # (B, L, dims / 2)
        cos, sin = mx.cos(theta), mx.sin(theta)
        c = mx.stack([cos, cos], axis=-2)[:, None]  # (B, 1, L, 2, dims / 2)
        s = mx.stack([-sin, sin], axis=-2)[:, None]
        return c, s


def fused_decode(cache: LayerCache | None, x: mx.array) -> bool:
    """True when this call is a decode step whose cache runs `decode_attention` natively."""
    ready = getattr(cache, "fused_ready", False)
    return bool(ready) and x.shape[1] == 1 and x.dtype == mx.float32


Columns = tuple[mx.array, int, int]  # (array (B, 1, features), first column, width)


def decode_attention(attn: Any, cache: Any, q: Columns, k: Columns, v: Columns) -> mx.array:
    """A decode step's whole attention in native nodes (where `fused_decode` says so).

    `attn` is the layer's attention module (n_heads, n_kv_heads, head_dim, rope, scale,
    window, use_qk_norm with q_norm/k_norm, and softcap where it has one). q, k and v are
    the projections' outputs before RoPE, as columns of their arrays (a fused projection's
    one product: `quantized.project_columns`), so no slice node comes between them and the
    kernels; the result is (B, 1, H * D). RoPE, the KV write into the batched decoder's
    slot cache and the attention are three kernel calls (`kernels/attn_kernels.h`,
    engine/decoder.py) where MLX ops take about 30 graph nodes per layer, whose dispatch
    is most of a CPU decode step's cost beyond reading the weights (benchmarks/NOTES.md).
    """
    if getattr(attn, "use_qk_norm", False):  # the norms need the heads as arrays
        B, D = q[0].shape[0], attn.head_dim
        q_heads = _columns(q).reshape(B, 1, attn.n_heads, D)
        k_heads = _columns(k).reshape(B, 1, attn.n_kv_heads, D)
        q = (attn.q_norm(q_heads).reshape(B, 1, -1), 0, q[2])
        k = (attn.k_norm(k_heads).reshape(B, 1, -1), 0, k[2])
    out: mx.array = cache.fused_attention(
        q,
        k,
        v,
        rope=attn.rope.native_params(),
        scale=attn.scale,
        window=attn.window or 0,
        softcap=getattr(attn, "softcap", None) or 0.0,
    )
    return out


def _columns(c: Columns) -> mx.array:
    array, start, width = c
    return array if start == 0 and width == array.shape[-1] else array[..., start : start + width]


# -- layer types, masks and attention ------------------------------------------------------------

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def checked_layer_types(
    types: list[str], num_layers: int, window: int | None, context: int | None = None
) -> list[str]:
    """A config's per-layer attention kinds, refused when we cannot run them.

    A window that covers the whole context (Phi-3.5: 262144 of 131072) is full attention.
    """
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    for kind in types:
        if kind not in (FULL_ATTENTION, SLIDING_ATTENTION):
            raise ValueError(f"layer type {kind!r} is not supported")
    # As in transformers, a "sliding" layer with no window attends everything.
    if not window or (context is not None and window >= context):
        return [FULL_ATTENTION] * num_layers
    return list(types)


def _visible(offset: int | mx.array, length: int, total: int, window: int | None) -> mx.array:
    """(B|1, 1, L, T) bool: key j is causal (and within `window`) for query position offset+i."""
    steps = mx.arange(length, dtype=mx.int32)
    if isinstance(offset, mx.array):
        queries = (offset.astype(mx.int32)[:, None] + steps[None, :])[:, None, :, None]  # (B,1,L,1)
    else:
        queries = (steps + offset)[None, None, :, None]  # (1, 1, L, 1)
    keys = mx.arange(total, dtype=mx.int32)  # (T,)
    causal = keys <= queries
    return causal if window is None else causal & (keys > queries - window)


def _additive(visible: mx.array, dtype: mx.Dtype) -> mx.array:
    return mx.where(visible, mx.array(0.0, dtype=dtype), mx.array(-math.inf, dtype=dtype))


def window_mask(
    mask: mx.array | str | None,
    offset: int | mx.array,
    length: int,
    total: int,
    window: int | None,
    dtype: mx.Dtype,
) -> mx.array | str | None:
    """`mask` narrowed to the last `window` positions of each query (transformers: k > q - window).

    Queries sit at positions offset..offset+length-1 and keys at 0..total-1
    (see contract.py). Returned unchanged when no query can see past the window.
    """
    if window is None or (isinstance(offset, int) and offset + length <= window):
        return mask
    visible = _visible(offset, length, total, window)
    if isinstance(mask, mx.array):
        return mx.where(visible, mask, mx.array(-math.inf, dtype=mask.dtype))
    return _additive(visible, dtype)


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None,
    offset: int | mx.array,
    softcap: float | None = None,
) -> mx.array:
    """(B, H, L, D) queries over (B, Hkv, T, D) keys/values -> (B, H, L, D).

    With `softcap` (Gemma 2) the scores go through cap * tanh(s / cap) before
    the mask, which the fused kernel cannot do; that path spells it out.
    """
    if softcap is None:
        return scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    n_kv, T = k.shape[1], k.shape[2]
    if isinstance(mask, str):  # "causal", spelled out
        mask = _additive(_visible(offset, L, T, None), q.dtype)
    q = (q * scale).reshape(B, n_kv, H // n_kv, L, D)
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # (B, Hkv, rep, L, T)
    scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, mx.array):
        scores = scores + mask[:, :, None]  # (B|1, 1, 1, L, T)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return (probs @ v[:, :, None]).reshape(B, H, L, -1)


# -- the contract, implemented once --------------------------------------------------------------


class CausalLMBase(nn.Module):
    """`contract.CausalLM` for a model with `self.model` = embed_tokens, layers, norm."""

    args: Any
    model: Any
    model_type: str

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        mask: mx.array | str | None = None,
        *,
        last_only: bool = False,
    ) -> mx.array:
        """Logits for every position, or only the last one (B, 1, vocab) with `last_only`."""
        h = self.model(inputs, cache, mask)
        if last_only:
            h = h[:, -1:, :]  # a prefill needs one row of the (large) vocab projection
        return self.logits(h)

    def hidden_states(
        self, inputs: mx.array, cache: list[Any] | None = None, mask: mx.array | str | None = None
    ) -> mx.array:
        return self.model(inputs, cache, mask)  # type: ignore[no-any-return]

    def logits(self, h: mx.array) -> mx.array:
        """Final-norm hidden states (B, L, D) -> logits (B, L, vocab)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # type: ignore[no-any-return]
        return self.lm_head(h)  # type: ignore[no-any-return]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint entries the model has no place for."""
        out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
            out.pop("lm_head.scales", None)
            out.pop("lm_head.biases", None)
        return out

    def make_cache(self) -> list[LayerCache]:
        from ffai_worker.models.cache import KVCache

        return [KVCache() for _ in range(self.num_layers)]

    @property
    def layers(self) -> list[Any]:
        return self.model.layers  # type: ignore[no-any-return]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def n_kv_heads(self) -> int:
        return int(self.args.num_key_value_heads or self.args.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(self.args.head_dim or self.args.hidden_size // self.args.num_attention_heads)

    @property
    def cache_dtype(self) -> mx.Dtype:
        embed = self.model.embed_tokens
        compute: mx.Dtype | None = getattr(embed, "compute_dtype", None)  # the native kernel's
        if compute is not None:
            return compute
        scales = getattr(embed, "scales", None)  # quantized: computes in its scales' dtype
        dtype: mx.Dtype = (scales if scales is not None else embed.weight).dtype
        return dtype

    @property
    def layer_types(self) -> list[str]:
        return list(self.args.layer_types)

    @property
    def sliding_window(self) -> int | None:
        window = self.args.sliding_window
        return int(window) if window and SLIDING_ATTENTION in self.args.layer_types else None
