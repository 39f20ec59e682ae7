"""Find a model (local folder or hub id) and load it into an MLX model.

Dtype policy (`load_model(dtype=None, dequantize=None)`), "fastest on this device":
- GPU (Metal, CUDA): keep the checkpoint's float dtype and keep quantized weights.
- CPU: float32. Quantized layers run on the native kernel (`models/quantized.py`)
  when it is built and takes their format; otherwise the checkpoint is
  dequantized to float32 at load when that fits in available memory, since
  MLX's own CPU quantized matmul is slower than float32 (benchmarks/NOTES.md).
An explicit `dtype` ("float32", "float16", "bfloat16") sets the float dtype of
every non-quantized parameter (and of dequantized weights); quantized weights
are then dequantized automatically only when that dtype is float32 on CPU.
`dequantize=True` or `False` overrides the automatic choice.
`dtype="q8"` or `"q4"` quantizes a float checkpoint at load (MLX's affine format,
64 weights per scale); the rest of the parameters stay float32 on CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ffai_worker.models import SUPPORTED_MODEL_TYPES, get_architecture
from ffai_worker.models.contract import Architecture, CausalLM
from ffai_worker.models.cpu_ops import fuse_float_siblings, use_native_linear
from ffai_worker.models.quantized import (
    GROUP_SIZE,
    QUANTIZED_DTYPES,
    fuse_siblings,
    quantize_model,
    use_kernel,
)
from ffai_worker.native import quant as quant_kernel

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# Dequantize only when the float32 weights take at most this share of available RAM
# (the rest is for the KV cache, activations and the rest of the system).
DEQUANTIZE_MEMORY_SHARE = 0.7


class ModelLoadError(Exception):
    """The model could not be found, read, or is of a kind this worker cannot run."""


@dataclass
class LoadedModelInfo:
    path: Path
    model_type: str
    architecture: str  # the model class, e.g. "qwen2.Model"
    context_length: int
    dtype: str  # float dtype of the non-quantized parameters
    quantization: dict[str, Any] | None  # as in the checkpoint's config
    dequantized: bool
    weights_bytes: int
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)


def dtype_name(dtype: mx.Dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).rsplit(".", 1)[-1]


def on_gpu() -> bool:
    return bool(mx.default_device().type == mx.DeviceType.gpu)


# -- finding the folder --------------------------------------------------------------------------


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local model folder, or a hub id fetched (or found in the cache) with huggingface_hub."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    looks_local = model.startswith((".", "/", "~")) or local.exists() or model.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model folder not found: {local.resolve()}")
    return _download(model, revision, tried=local.resolve())


def _download(repo_id: str, revision: str | None, tried: Path) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    what = f"hub id {repo_id!r} (revision {revision or 'main'})"
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except HFValidationError as exc:
        raise ModelLoadError(
            f"no model folder at {tried}, and {repo_id!r} is not a valid hub id ({exc})"
        ) from exc
    except Exception as exc:  # offline, unknown repo or revision, network, disk
        if constants.HF_HUB_OFFLINE:
            detail = "HF_HUB_OFFLINE is set and it is not in the local hub cache"
        else:
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ModelLoadError(
            f"cannot load model {repo_id!r}: no local folder at {tried}, and {what} "
            f"could not be fetched ({detail})"
        ) from exc
    return Path(path)


# -- reading the checkpoint ----------------------------------------------------------------------


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the sharded index's files, or model*.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names missing shards: {', '.join(missing)}")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {path} (PyTorch .bin checkpoints are not supported)"
        )
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        try:
            loaded = mx.load(str(file))
        except Exception as exc:  # mlx raises RuntimeError/ValueError for bad files
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
        assert isinstance(loaded, dict)
        weights.update(loaded)
    return weights


def checkpoint_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The float dtype holding most of the checkpoint's float bytes."""
    by_dtype: dict[mx.Dtype, int] = {}
    for w in weights.values():
        if mx.issubdtype(w.dtype, mx.floating):
            by_dtype[w.dtype] = by_dtype.get(w.dtype, 0) + w.nbytes
    return max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else mx.float32


# -- quantization --------------------------------------------------------------------------------


def read_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The MLX affine quantization block of a config (None if not quantized)."""
    quant = config.get("quantization")
    if quant is None:
        other = config.get("quantization_config")
        if isinstance(other, dict) and other.get("quant_method"):
            raise ModelLoadError(
                f"quantization method {other['quant_method']!r} is not supported "
                "(only MLX affine quantization, as written by mlx_lm.convert -q)"
            )
        return None
    mode = quant.get("mode", "affine")
    if mode != "affine" or "bits" not in quant or "group_size" not in quant:
        raise ModelLoadError(f"unsupported quantization {quant!r} (MLX affine 4/8-bit only)")
    return dict(quant)


def _layer_params(quant: dict[str, Any], layer: str) -> dict[str, Any]:
    """group_size/bits of one layer: mlx_lm may override them per layer path."""
    own = quant.get(layer)
    base = {"group_size": quant["group_size"], "bits": quant["bits"]}
    return {**base, **own} if isinstance(own, dict) else base


def quantized_layers(weights: dict[str, mx.array]) -> list[str]:
    return [k[: -len(".scales")] for k in weights if k.endswith(".scales")]


def dequantized_bytes(weights: dict[str, mx.array], quant: dict[str, Any], dtype: mx.Dtype) -> int:
    """Bytes of all weights once every quantized layer is expanded to `dtype`."""
    layers = set(quantized_layers(weights))
    total = 0
    for key, w in weights.items():
        layer = key.rsplit(".", 1)[0]
        if layer in layers and key.endswith((".scales", ".biases")):
            continue
        if layer in layers and key.endswith(".weight"):
            bits = _layer_params(quant, layer)["bits"]
            total += w.size * (32 // bits) * dtype.size
        else:
            total += w.size * dtype.size
    return total


def dequantize_weights(
    weights: dict[str, mx.array], quant: dict[str, Any], dtype: mx.Dtype
) -> dict[str, mx.array]:
    """Replace each quantized (weight, scales, biases) triple by a plain `dtype` weight."""
    out = dict(weights)
    for layer in quantized_layers(weights):
        p = _layer_params(quant, layer)
        out[f"{layer}.weight"] = mx.dequantize(
            out[f"{layer}.weight"],
            out.pop(f"{layer}.scales"),
            out.pop(f"{layer}.biases", None),
            group_size=p["group_size"],
            bits=p["bits"],
        ).astype(dtype)
    return out


def quantize_like(model: nn.Module, weights: dict[str, mx.array], quant: dict[str, Any]) -> None:
    """Turn into quantized layers exactly the layers that have scales in the checkpoint."""
    layers = set(quantized_layers(weights))

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path not in layers:
            return False
        return _layer_params(quant, path)

    nn.quantize(model, class_predicate=predicate)


def available_memory() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# -- building the model --------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _choose_dequantize(
    weights: dict[str, mx.array], quant: dict[str, Any], dtype: mx.Dtype, notes: list[str]
) -> bool:
    """Automatic choice: dequantize on CPU to float32 when that fits comfortably in RAM."""
    if on_gpu() or dtype != mx.float32:
        return False  # half-precision CPU matmuls are no faster than quantized ones
    if (
        quant_kernel.available()
        and quant["bits"] in (4, 8)
        and quant["group_size"] in (32, 64, 128)
    ):
        return False  # the native kernel reads the packed weights directly
    need = dequantized_bytes(weights, quant, dtype)
    free = available_memory()
    if free is not None and need > DEQUANTIZE_MEMORY_SHARE * free:
        notes.append(
            f"kept {quant['bits']}-bit weights: {dtype_name(dtype)} would need {_size(need)}, "
            f"{_size(free)} available (quantized matmuls are ~2.8x slower on CPU)"
        )
        return False
    notes.append(
        f"dequantized {quant['bits']}-bit weights to {dtype_name(dtype)} ({_size(need)}): "
        "MLX's CPU backend runs float32 matmuls ~2.8x faster than quantized ones"
    )
    return True


def _build(arch: Architecture, config: dict[str, Any]) -> tuple[Any, Any]:
    """(args, model): the model is both a CausalLM and the nn.Module the loader fills."""
    try:
        args = arch.ModelArgs.from_dict(config)
        return args, arch.Model(args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"unsupported or incomplete config.json: {exc}") from exc


def _load_into(model: Any, weights: dict[str, mx.array], path: Path) -> None:
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights in {path} do not fit the model: {exc}") from exc


def _architecture(config: dict[str, Any], path: Path) -> Architecture:
    model_type = config.get("model_type")
    arch = get_architecture(str(model_type))
    if arch is None:
        raise ModelLoadError(
            f"model_type {model_type!r} in {path / 'config.json'} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return arch


def load_model(
    path: Path, *, dtype: str | None = None, dequantize: bool | None = None
) -> tuple[CausalLM, LoadedModelInfo]:
    """Read config.json + safetensors from `path` into a ready, evaluated model (see module doc)."""
    path = Path(path)
    config = _read_json(path / "config.json", required=True)
    arch = _architecture(config, path)
    if dtype is not None and dtype not in DTYPES and dtype not in QUANTIZED_DTYPES:
        names = ", ".join([*DTYPES, *QUANTIZED_DTYPES])
        raise ModelLoadError(f"dtype {dtype!r} is not one of {names}")
    weights = read_weights(path)
    quant = read_quantization(config)
    bits = QUANTIZED_DTYPES.get(dtype or "")
    if bits and quant is not None:
        raise ModelLoadError(
            f"the checkpoint is already quantized ({quant['bits']}-bit); "
            f"load it without dtype {dtype!r}"
        )
    source = checkpoint_dtype(weights)
    default = source if on_gpu() else mx.float32
    target = DTYPES[dtype] if dtype in DTYPES else default
    notes: list[str] = []

    model_config = dict(config)
    # transformers' default is untied; an absent key with no lm_head means tied.
    model_config.setdefault("tie_word_embeddings", "lm_head.weight" not in weights)
    args, model = _build(arch, model_config)
    weights = model.sanitize(weights)

    dequantized = False
    if quant is not None:
        if dequantize is None:
            dequantize = _choose_dequantize(weights, quant, target, notes)
        if dequantize:
            weights = dequantize_weights(weights, quant, target)
            dequantized = True
        else:
            quantize_like(model, weights, quant)
    if target != source and not dequantized:
        notes.append(f"cast {dtype_name(source)} weights to {dtype_name(target)}")
    _load_into(model, weights, path)
    del weights  # the model holds what it needs; let a cast free the originals
    _cast_floats(model, target)
    if bits:
        quant = {"group_size": GROUP_SIZE, "bits": bits}
        layers = quantize_model(model, bits)
        notes.append(f"quantized {layers} layers to {bits}-bit at load (group size {GROUP_SIZE})")
    if quant is not None and not dequantized and not on_gpu():
        switched = use_kernel(model) if quant_kernel.available() else 0
        notes.append(_kernel_note(switched, fuse_siblings(model) if switched else 0))
    if not on_gpu() and quant_kernel.available():
        use_native_linear(model)  # float layers left: one node per decode-step product
        fuse_float_siblings(model)  # and one product per q/k/v or gate/up group
    model.eval()
    mx.eval(model.parameters())

    info = LoadedModelInfo(
        path=path,
        model_type=str(config["model_type"]),
        architecture=f"{arch.__name__.rsplit('.', 1)[-1]}.{type(model).__name__}",
        context_length=int(args.max_position_embeddings),
        dtype=dtype_name(target),
        quantization=quant,
        dequantized=dequantized,
        weights_bytes=parameter_bytes(model),
        notes=notes,
        config=config,
        generation_config=_read_json(path / "generation_config.json"),
    )
    return model, info


def _kernel_note(switched: int, fused: int) -> str:
    if switched:
        groups = f", {fused} sibling groups fused" if fused else ""
        return (
            f"{switched} quantized layers on the native kernel{groups} ({quant_kernel.describe()})"
        )
    return f"quantized layers on MLX's CPU path, slower than float32: {quant_kernel.describe()}"


def parameter_bytes(model: nn.Module) -> int:
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return sum(int(v.nbytes) for _, v in flat)


def _cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast float parameters (norms, embeddings, scales) to `dtype`; packed ints stay."""
    floating: Callable[[mx.Dtype], bool] = lambda d: mx.issubdtype(d, mx.floating)  # noqa: E731
    model.set_dtype(dtype, predicate=floating)
