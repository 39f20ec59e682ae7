"""Checkpoint loading: shards, dtypes, MLX-quantized folders, config generations, errors, BLAS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# isort: off
import ffai_worker  # noqa: F401  (first: it preloads a fast BLAS before mlx loads)

# isort: on
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from checkpoints import (
    LLAMA3_ROPE_SCALING,
    build_llama,
    build_qwen2,
    greedy_ours,
    load_reference,
)

from ffai_worker.models import SUPPORTED_MODEL_TYPES, llama, qwen3
from ffai_worker.models.loading import ModelLoadError, load_model, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "models" / "tinystories-260k"
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
IDS = [5, 17, 99, 3, 42, 7, 250, 31, 64, 8, 200, 11]


def reference_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    with torch.no_grad():
        return load_reference(path)(torch.tensor([ids])).logits[0].numpy()  # type: ignore[no-any-return]


def our_logits(model: Any, ids: list[int] = IDS) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


# -- layouts and dtypes ----------------------------------------------------------------------------


def test_sharded_checkpoint(tmp_path: Path) -> None:
    path = build_qwen2(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, info = load_model(path)
    np.testing.assert_allclose(our_logits(model), reference_logits(path), atol=1e-4)
    assert info.architecture == "qwen2.Model"
    assert info.weights_bytes == sum(
        (path / f).stat().st_size for f in set(index["weight_map"].values())
    ) - sum(_header_bytes(path / f) for f in set(index["weight_map"].values()))


def _header_bytes(file: Path) -> int:
    """safetensors files start with an 8-byte length and a JSON header."""
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    path = build_llama(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoint_runs_float32_on_cpu(tmp_path: Path, dtype: str) -> None:
    path = build_llama(tmp_path / dtype, dtype=dtype)
    model, info = load_model(path)
    assert info.dtype == "float32" and not info.dequantized
    assert any(f"cast {dtype} weights to float32" in note for note in info.notes)
    assert model.model.embed_tokens.weight.dtype == mx.float32
    # transformers upcasts the same half values to float32: same numbers.
    np.testing.assert_allclose(our_logits(model), reference_logits(path), atol=1e-4)


def test_explicit_dtype_casts(tmp_path: Path) -> None:
    path = build_llama(tmp_path / "f32")
    model, info = load_model(path, dtype="bfloat16")
    assert info.dtype == "bfloat16"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert model(mx.array([IDS])).dtype == mx.bfloat16
    np.testing.assert_allclose(our_logits(model), reference_logits(path), atol=0.1)
    with pytest.raises(ModelLoadError, match="float32"):
        load_model(path, dtype="int8")


def test_tied_embeddings_default_when_config_is_silent(tmp_path: Path) -> None:
    path = build_llama(tmp_path / "tied", tie_word_embeddings=True)
    expected = reference_logits(path)  # before the key goes: transformers would untie
    config = json.loads((path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load_model(path)
    assert "lm_head" not in model
    np.testing.assert_allclose(our_logits(model), expected, atol=1e-4)


def test_info_fields(tmp_path: Path) -> None:
    _, info = load_model(TINYSTORIES)
    assert info.model_type == "llama" and info.architecture == "llama.Model"
    assert info.context_length == 512
    assert info.quantization is None and info.notes == []
    assert info.generation_config["eos_token_id"] == [2, 1]
    assert info.config["vocab_size"] == 512
    file = TINYSTORIES / "model.safetensors"
    assert info.weights_bytes == file.stat().st_size - _header_bytes(file)
    assert info.path == TINYSTORIES


def test_sliding_window_keeps_full_context(tmp_path: Path) -> None:
    path = build_llama(tmp_path / "m", max_position_embeddings=512)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="mistral", sliding_window=128)
    (path / "config.json").write_text(json.dumps(config))
    model, info = load_model(path)
    assert info.context_length == 512  # windowed attention is real: no cap at the window
    assert not any("sliding window" in note for note in info.notes)
    assert model.sliding_window == 128 and set(model.layer_types) == {"sliding_attention"}


# -- config generations ----------------------------------------------------------------------------

BASE = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 1,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "vocab_size": 32,
    "max_position_embeddings": 4096,
}


def test_rope_parameters_equal_rope_theta_style() -> None:
    v4 = llama.ModelArgs.from_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE_SCALING)}
    )
    v5 = llama.ModelArgs.from_dict(
        {**BASE, "rope_parameters": {**LLAMA3_ROPE_SCALING, "rope_theta": 500000.0}}
    )
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v5.rope_scaling is not None and v4.rope_scaling is not None
    assert v5.rope_scaling["rope_type"] == v4.rope_scaling["rope_type"] == "llama3"
    x = mx.random.normal((1, 4, 40, 16), key=mx.random.key(1))
    rope4, rope5 = (
        llama.Model(v4).layers[0].self_attn.rope,
        llama.Model(v5).layers[0].self_attn.rope,
    )
    np.testing.assert_array_equal(np.array(rope4(x, offset=3)), np.array(rope5(x, offset=3)))

    plain = llama.ModelArgs.from_dict(
        {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    )
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    assert llama.ModelArgs.from_dict(BASE).rope_theta == 10000.0


def test_transformers4_config_gives_same_logits(tmp_path: Path) -> None:
    """Rewrite a transformers-5 config.json in transformers-4 style: same model."""
    path = build_llama(tmp_path / "v5", rope_scaling=dict(LLAMA3_ROPE_SCALING), rope_theta=5e4)
    config = json.loads((path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    v4 = tmp_path / "v4"
    v4.mkdir()
    (v4 / "config.json").write_text(json.dumps(config))
    (v4 / "model.safetensors").symlink_to(path / "model.safetensors")
    ids = list(range(3, 63))  # 60 tokens, past original_max_position_embeddings
    np.testing.assert_array_equal(
        our_logits(load_model(v4)[0], ids), our_logits(load_model(path)[0], ids)
    )


def test_qwen3_head_dim_and_unknown_keys() -> None:
    args = qwen3.ModelArgs.from_dict({**BASE, "model_type": "qwen3", "some_future_key": 1})
    assert args.head_dim == 128  # Qwen3's own default, not hidden / heads
    assert llama.ModelArgs.from_dict({**BASE, "head_dim": None}).head_dim == 16


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert "'gpt2'" in str(err.value)
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in str(err.value) and name in SUPPORTED_MODEL_TYPES


def test_missing_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "yarn", "factor": 4.0}, "rope type 'yarn' is not supported"),
        ({"rope_type": "longrope"}, "longrope rope scaling lacks long_factor"),
    ],
)
def test_unsupported_rope_type(tmp_path: Path, rope: dict[str, Any], message: str) -> None:
    path = build_llama(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {**rope, "rope_theta": 1e4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        resolve_model_path(str(missing))
    assert resolve_model_path(str(TINYSTORIES)) == TINYSTORIES.resolve()


def test_offline_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model_path("ffai-tests/no-such-model", revision="v1")
    message = str(err.value)
    for part in ("ffai-tests/no-such-model", "v1", "HF_HUB_OFFLINE", str(tmp_path)):
        assert part in message


# -- MLX-quantized checkpoints ---------------------------------------------------------------------


def quantize_with_mlx_lm(src: Path, dst: Path, bits: int) -> Path:
    from mlx_lm.utils import load_model as lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = lm_load_model(src)
    model, config = quantize_model(model, config, group_size=64, bits=bits)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return dst


def mlx_lm_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as lm_load_model

    model, _ = lm_load_model(path)
    steps = generate_step(mx.array(prompt), model, max_tokens=n)  # default sampler: argmax
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize(("source", "bits"), [("random", 4), ("random", 8), ("tinystories", 4)])
def test_quantized_matches_mlx_lm(tmp_path: Path, source: str, bits: int) -> None:
    src = TINYSTORIES if source == "tinystories" else build_llama(tmp_path / "src")
    path = quantize_with_mlx_lm(src, tmp_path / f"q{bits}", bits)
    prompt = [1, 403, 407, 261, 378] if source == "tinystories" else IDS
    expected = mlx_lm_greedy(path, prompt, 32)

    dense, info = load_model(path, dequantize=True)
    assert info.dequantized and info.dtype == "float32"
    assert info.quantization is not None and info.quantization["bits"] == bits
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
    assert greedy_ours(dense, prompt, 32) == expected

    # MLX's own quantized path (the native kernel, tested in test_quantized.py, is off)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FFAI_QUANT_KERNEL", "0")
        packed, info = load_model(path, dequantize=False)
        assert not info.dequantized
        assert type(packed.layers[0].self_attn.q_proj) is nn.QuantizedLinear
        assert info.weights_bytes < 0.5 * dense_bytes(dense)
        assert greedy_ours(packed, prompt, 32) == expected
    if source == "tinystories":  # 172 inputs: mlx_lm leaves down_proj unquantized
        assert type(packed.layers[0].mlp.down_proj) is nn.Linear
        assert isinstance(packed.model.embed_tokens, nn.QuantizedEmbedding)


def test_quantized_checkpoint_default_on_cpu(tmp_path: Path) -> None:
    """Without a kernel a CPU dequantizes (MLX's quantized matmul is slower than float32)."""
    from ffai_worker.native import quant

    path = quantize_with_mlx_lm(build_llama(tmp_path / "src"), tmp_path / "q4", 4)
    _, info = load_model(path)
    assert info.dequantized != quant.available()
    assert any(("native kernel" if quant.available() else "dequantized") in n for n in info.notes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FFAI_QUANT_KERNEL", "0")
        _, info = load_model(path)
        assert info.dequantized and any("dequantized" in n for n in info.notes)


def dense_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_foreign_quantization_is_refused(tmp_path: Path) -> None:
    path = build_llama(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="gptq"):
        load_model(path)


# -- BLAS ------------------------------------------------------------------------------------------

PROBE = """
import ffai_worker
import mlx.core as mx
a, b = mx.ones((8, 64)), mx.ones((64, 64))
mx.eval(a @ b.T)
print(ffai_worker.blas_info())
"""


def probe(ffai_blas: str | None, small_gemm: str = "0") -> tuple[str, str]:
    """blas_info() and the library the dynamic linker bound MLX's cblas_sgemm to."""
    env = {k: v for k, v in os.environ.items() if k != "FFAI_BLAS"}
    if ffai_blas is not None:
        env["FFAI_BLAS"] = ffai_blas
    env["FFAI_SMALL_GEMM"] = small_gemm
    env["PYTHONPATH"] = str(REPO)
    env["LD_DEBUG"] = "bindings"  # the loader reports every symbol binding on stderr
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    bound = [
        line.split(" to ", 1)[1].split(" [")[0]
        for line in done.stderr.splitlines()
        if "libmlx.so" in line.split(" to ")[0] and line.rstrip().endswith("`cblas_sgemm'")
    ]
    assert len(bound) == 1, bound
    return done.stdout.strip(), bound[0]


@pytest.mark.skipif(not OPENBLAS.exists(), reason="no system OpenBLAS")
def test_openblas_is_preloaded_and_used() -> None:
    info, sgemm = probe(None)
    assert info.startswith("openblas ") and str(OPENBLAS) in info
    assert Path(sgemm).resolve() == OPENBLAS.resolve()  # MLX's matmul really calls OpenBLAS
    off_info, off_sgemm = probe("off")
    assert off_info.startswith("reference")
    assert "openblas" not in off_sgemm and "mlx_cpu.libs" in off_sgemm
    info, sgemm = probe(str(OPENBLAS))
    assert info.startswith("openblas ") and Path(sgemm).resolve() == OPENBLAS.resolve()


@pytest.mark.skipif(not OPENBLAS.exists() or not shutil.which("cc"), reason="no OpenBLAS or cc")
def test_small_gemm_kernel_sits_in_front_of_openblas() -> None:
    info, sgemm = probe(None, small_gemm="8")
    assert "small-M kernel: M<=8" in info and str(OPENBLAS) in info
    assert Path(sgemm).name.startswith("_kernels")  # libmlx's matmul calls the kernel


KERNEL_CHECK = """
import ffai_worker
from ffai_worker.native.blas import small_gemm_kernel
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
worst = 0.0
for m, n, k in [(1, 4864, 896), (3, 896, 4864), (8, 1000, 67), (9, 300, 40), (2, 17, 5)]:
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (n,)))
    got = np.array(mx.addmm(mx.array(b), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0))
    want = 0.5 * (x.astype(np.float64) @ w.T.astype(np.float64)) + 2.0 * b
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    plain, exact = np.array(mx.array(x) @ mx.array(w).T), x.astype(np.float64) @ w.T
    worst = max(worst, float(np.abs(plain - exact).max() / np.abs(exact).max()))
# One row alone or among seven others: bit-identical (batch invariance).
x, w = rng.standard_normal((8, 896)).astype(np.float32), rng.standard_normal((4864, 896))
W = mx.array(w.astype(np.float32))
alone, batched = np.array(mx.array(x[3:4]) @ W.T), np.array(mx.array(x) @ W.T)[3:4]
print(worst, (alone == batched).all(), *small_gemm_kernel().calls())
"""


@pytest.mark.skipif(not OPENBLAS.exists() or not shutil.which("cc"), reason="no OpenBLAS or cc")
def test_small_gemm_kernel_is_exact_and_batch_invariant() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FFAI_SMALL_GEMM": "8"}
    env["FFAI_SMALL_GEMM_MIN_ELEMENTS"] = "0"  # small shapes too: every tile and tail
    env.pop("FFAI_BLAS", None)
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, check=True
    )
    worst, invariant, taken, passed = out.stdout.split()
    assert float(worst) < 1e-4 and invariant == "True"
    assert int(taken) >= 9 and int(passed) >= 2  # M <= 8 taken; M = 9 passed to OpenBLAS


def test_blas_choice_is_recorded_when_mlx_came_first() -> None:
    code = "import mlx.core, ffai_worker; print(ffai_worker.blas_info())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "mlx was imported before ffai_worker" in out.stdout
