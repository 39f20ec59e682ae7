"""4- and 8-bit weights on the CPU: quantize at load, and run on the native kernel.

MLX's CPU `quantized_matmul` is a scalar loop, slower than a float32 product, so on a
CPU the quantized layers of a model are switched to `Kernel*` subclasses of MLX's own
`QuantizedLinear` / `QuantizedEmbedding` that call `ffai_worker.native.quant` (an MLX
primitive over `kernels/quant_gemm.c`). The weights stay quantized: decode reads 1/4 or
1/8 of the float32 bytes. Checkpoint keys are MLX's, so an `mlx_lm.convert -q` checkpoint
loads as it is, and a layer the kernel cannot take keeps MLX's path.

On the switch, `weight`, `scales` and `biases` are rearranged into the kernel's packed
layout (`quant.pack`: blocks of 16 rows, a SIMD lane per row), which reads memory as one
stream per block and needs no horizontal sums: 2-3x faster per product than MLX's
row-major layout (`benchmarks/quant_kernel.py`). The layer keeps its true output width
in `packed_n`; `unpacked()` gives MLX's arrays back.

Sibling projections of one input (q/k/v, gate/up) are then fused (`fuse_siblings`): their
packed blocks are concatenated into one `KernelFusedLinear` on the parent module, and
each sibling becomes a `FusedMember` returning its slice. The models call them through
`project(x, *layers)`, which runs the group once: one activation quantization and one
kernel call instead of three (q/k/v over 24 layers at batch 1: 2.5 -> 1.3 ms), and
fewer graph nodes per decode step. Each output is computed by the same operations as
unfused (a lane per row), so the logits are the same to the bit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from ffai_worker.native import quant

# `--dtype q8` / `q4`: MLX's affine format, 64 weights per (scale, bias) as mlx_lm uses.
QUANTIZED_DTYPES = {"q8": 8, "q4": 4}
GROUP_SIZE = 64
_KERNEL_BITS = (4, 8)
_KERNEL_GROUPS = (32, 64, 128)
_FLOAT16_MAX = 65504.0
_FLOAT16_MIN_NORMAL = 6.104e-05


class _Packed:
    """The packed arrays of a switched layer (see the module docstring)."""

    packed_n: int
    bits: int
    group_size: int
    __getitem__: Any  # nn.Module's (a dict): the mixin must not define its own

    def _matmul(
        self, x: mx.array, bias: mx.array | None = None, gate: tuple[int, int] | None = None
    ) -> mx.array:
        return quant.quant_matmul(
            x,
            self["weight"],
            self["scales"],
            self["biases"],
            bits=self.bits,
            group_size=self.group_size,
            packed_n=self.packed_n,
            bias=bias,
            gate=gate,
        )

    def _bias(self) -> mx.array | None:
        """The layer's float32 bias (the kernel adds it), or None."""
        return self["bias"].astype(mx.float32) if "bias" in self else None

    def unpacked(self) -> tuple[mx.array, mx.array, mx.array]:
        """(weight, scales, biases) in MLX's row-major layout."""
        return tuple(  # type: ignore[return-value]
            quant.unpack(self[k], self.packed_n) for k in ("weight", "scales", "biases")
        )


class KernelQuantizedLinear(_Packed, nn.QuantizedLinear):
    """MLX's QuantizedLinear on packed weights, computed by the native kernel (float32 out)."""

    compute_dtype = mx.float32

    def __call__(self, x: mx.array) -> mx.array:
        return self._matmul(x, self._bias())

    def from_gate(self, y: mx.array, gate: int, up: int) -> mx.array:
        """This layer over `silu(y[..., gate:gate+K]) * y[..., up:up+K]` (y a fused gate/up
        product), the gate computed inside the product's node (cpu_ops.gated_down)."""
        return self._matmul(y, self._bias(), gate=(gate, up))


class KernelQuantizedEmbedding(_Packed, nn.QuantizedEmbedding):
    """MLX's QuantizedEmbedding on packed weights: float32 rows, the tied LM head on the kernel."""

    compute_dtype = mx.float32

    def __call__(self, x: mx.array) -> mx.array:
        ext = quant.native_ops()
        if ext is not None and mx.issubdtype(x.dtype, mx.integer):  # lookup and dequantize
            ids = x if x.dtype == mx.int32 else x.astype(mx.int32)  # (mx.argmax's are uint32)
            return ext.embed_rows(  # type: ignore[no-any-return]
                ids,
                self["weight"],
                self["scales"],
                self["biases"],
                bits=self.bits,
                group_size=self.group_size,
                rows=self.packed_n,
            )
        w, s, b = (quant.packed_rows(self[k], x) for k in ("weight", "scales", "biases"))
        return mx.dequantize(
            w,
            s.astype(mx.float32),
            b.astype(mx.float32),
            group_size=self.group_size,
            bits=self.bits,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        return self._matmul(x)


def quantize_model(model: nn.Module, bits: int, group_size: int = GROUP_SIZE) -> int:
    """Quantize every Linear and Embedding whose input width the group size divides."""
    count = 0

    def predicate(path: str, module: nn.Module) -> bool:
        nonlocal count
        weight = getattr(module, "weight", None)
        ok = hasattr(module, "to_quantized") and weight is not None
        ok = ok and weight.shape[-1] % group_size == 0
        count += int(ok)
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return count


def kernel_takes(module: nn.Module) -> bool:
    return (
        getattr(module, "mode", "affine") == "affine"
        and getattr(module, "bits", None) in _KERNEL_BITS
        and getattr(module, "group_size", None) in _KERNEL_GROUPS
        and "biases" in module
    )


def use_kernel(model: nn.Module) -> int:
    """Switch the quantized layers the kernel takes onto it, packed; returns how many.

    Their scales and biases become float16 when every value fits its normal range
    (as llama.cpp stores them): per 64 weights that is 4 bytes instead of 8."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and kernel_takes(module):
            module.__class__ = KernelQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding and kernel_takes(module):
            module.__class__ = KernelQuantizedEmbedding
        else:
            continue
        switched += 1
        _halve_scales(module)
        module.packed_n = int(module["weight"].shape[0])
        for key in ("weight", "scales", "biases"):
            module[key] = quant.pack(module[key])
    return switched


def _halve_scales(module: Any) -> None:
    scales, biases = module["scales"], module["biases"]
    largest = mx.maximum(mx.abs(scales).max(), mx.abs(biases).max()).item()
    nonzero = mx.where(scales == 0, mx.array(float("inf"), scales.dtype), mx.abs(scales))
    if largest < _FLOAT16_MAX and nonzero.min().item() >= _FLOAT16_MIN_NORMAL:
        module["scales"] = scales.astype(mx.float16)
        module["biases"] = biases.astype(mx.float16)


# -- sibling projections of one input as one product ----------------------------------------

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class KernelFusedLinear(_Packed, nn.Module):
    """Packed projections of one input, concatenated: one product, a slice per member."""

    def __init__(self, members: Sequence[KernelQuantizedLinear]) -> None:
        super().__init__()
        self.bits, self.group_size = members[0].bits, members[0].group_size
        # Each member's outputs start on a block: (start, width) per member. Plain
        # attributes (a tuple set normally would become a child of the module).
        starts = [0]
        for m in members[:-1]:
            starts.append(starts[-1] + _padded_rows(m))
        slices = tuple(zip(starts, (m.packed_n for m in members), strict=True))
        object.__setattr__(self, "slices", slices)
        for key in ("weight", "scales", "biases"):
            self[key] = mx.concatenate([m[key] for m in members])
        self.packed_n = int(self["weight"].shape[0]) * quant.PACK_ROWS
        if any("bias" in m for m in members):
            self["bias"] = mx.concatenate([_padded_bias(m) for m in members])

    def product(self, x: mx.array) -> mx.array:
        """The members' outputs side by side, at their `slices` (padding between them)."""
        return self._matmul(x, self._bias())

    def __call__(self, x: mx.array) -> list[mx.array]:
        y = self.product(x)
        return [y[..., start : start + width] for start, width in self.slices]


class FusedGroup(Protocol):
    """Sibling projections as one product: KernelFusedLinear, or cpu_ops.NativeFusedLinear
    for float layers. `slices` holds each member's (first column, width) in `product`."""

    slices: tuple[tuple[int, int], ...]

    def product(self, x: mx.array) -> mx.array: ...

    def __call__(self, x: mx.array) -> list[mx.array]: ...


class FusedMember(nn.Module):
    """A fused projection's place in its parent: its slice of the group's product."""

    def __init__(self, group: FusedGroup, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", weakref.ref(group))  # the parent holds the group
        self.index = index

    def __call__(self, x: mx.array) -> mx.array:
        return self.group()(x)[self.index]  # type: ignore[no-any-return]


def fused_group(layers: tuple[Any, ...]) -> FusedGroup | None:
    """The group `fuse_siblings` made of exactly these layers, in order, else None."""
    first = layers[0]
    if not isinstance(first, FusedMember):
        return None
    group: FusedGroup = first.group()
    same = all(
        isinstance(m, FusedMember) and m.group() is group and m.index == i
        for i, m in enumerate(layers)
    )
    return group if same and len(layers) == len(group.slices) else None


def project(x: mx.array, *layers: Any) -> list[mx.array]:
    """`[layer(x) for layer in layers]`, as one product where `fuse_siblings` fused them."""
    group = fused_group(layers)
    if group is not None:
        return group(x)  # type: ignore[no-any-return]
    return [layer(x) for layer in layers]


def project_columns(x: mx.array, *layers: Any) -> list[tuple[mx.array, int, int]]:
    """`project`'s outputs as (array, first column, width): a fused group's one product and
    each member's columns in it, so that a native kernel reads the member there without a
    slice node (decode steps: see base.decode_attention and cpu_ops.gated); unfused
    layers give their own outputs from column 0."""
    group = fused_group(layers)
    if group is not None:
        y = group.product(x)
        return [(y, start, width) for start, width in group.slices]
    outs = [layer(x) for layer in layers]
    return [(out, 0, int(out.shape[-1])) for out in outs]


def _padded_rows(member: KernelQuantizedLinear) -> int:
    """Output rows of a packed member, padding included: its blocks times 16."""
    return int(member["weight"].shape[0]) * quant.PACK_ROWS


def _padded_bias(member: KernelQuantizedLinear) -> mx.array:
    bias = member["bias"] if "bias" in member else mx.zeros((member.packed_n,), mx.float32)
    return mx.pad(bias.astype(mx.float32), [(0, _padded_rows(member) - member.packed_n)])


def fuse_siblings(model: nn.Module) -> int:
    """Fuse each parent's q/k/v and gate/up kernel projections (see the module docstring);
    returns how many groups. Members must agree on bits, group size, input width and
    scale dtype, else they stay as they are."""
    return fuse_groups(model, KernelFusedLinear, _fusable)


def fuse_groups(
    model: nn.Module,
    make: Callable[[list[Any]], FusedGroup],
    fusable: Callable[[list[Any]], bool],
) -> int:
    """Replace each parent's SIBLINGS that `fusable` accepts by `make(members)`, stored as
    `fused_<names>` on the parent, and each member by its FusedMember; returns how many."""
    fused = 0
    for _, parent in model.named_modules():
        for names in SIBLINGS:
            members = [parent.get(name) for name in names]
            if not fusable(members):
                continue
            group = make(members)
            parent["fused_" + "_".join(names)] = group
            for index, name in enumerate(names):
                parent[name] = FusedMember(group, index)
            fused += 1
    return fused


def _fusable(members: list[Any]) -> bool:
    if not all(type(m) is KernelQuantizedLinear for m in members):
        return False
    keys = {(m.bits, m.group_size, m["weight"].shape[1], m["scales"].dtype) for m in members}
    return len(keys) == 1
