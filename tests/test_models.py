"""Model architectures against transformers: logits and greedy tokens on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# isort: off
import ffai_worker  # noqa: F401  (first: it preloads a fast BLAS before mlx loads)

# isort: on
import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import (
    BUILDERS,
    PHI3_LONG_FACTOR,
    PHI3_SHORT_FACTOR,
    SLIDING_WINDOW,
    build_llama,
    build_phi3,
    greedy_ours,
    greedy_reference,
    load_reference,
)

from ffai_worker.models.base import llama3_inv_freq, window_mask
from ffai_worker.models.cache import KVCache
from ffai_worker.models.loading import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "models" / "tinystories-260k"
VOCAB = 256
PROMPT_LENGTHS = (5, 17, 40)
ATOL = 1e-4


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: build(root / name, vocab_size=VOCAB, seed=seed)
        for seed, (name, build) in enumerate(BUILDERS.items())
    }


@pytest.fixture(scope="module")
def loaded(checkpoints: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """name -> (our model, transformers model)."""
    return {name: (load_model(path)[0], load_reference(path)) for name, path in checkpoints.items()}


def reference_logits(ref: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers(name: str, loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, ref = loaded[name]
    for ids in prompts():
        expected = reference_logits(ref, ids)  # (L, V)
        got = np.array(ours(mx.array([ids]))[0])
        np.testing.assert_allclose(got[-1], expected[-1], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)  # every position


@pytest.mark.parametrize("name", list(BUILDERS))
def test_greedy_matches_transformers(name: str, loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, ref = loaded[name]
    for ids in prompts(seed=1):
        assert greedy_ours(ours, ids, 64) == greedy_reference(ref, ids, 64)


def test_llama3_scaling_is_exercised(checkpoints: dict[str, Path]) -> None:
    """Dropping the llama3 rope scaling must break parity, so the parity test can fail."""
    path = checkpoints["llama3_scaled"]
    config = json.loads((path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    ref = load_reference(path)
    ids = prompts()[-1]  # 40 tokens, past original_max_position_embeddings=32
    unscaled_dir = path.parent / "llama3_unscaled"
    unscaled_dir.mkdir(exist_ok=True)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (unscaled_dir / "config.json").write_text(json.dumps(config))
    (unscaled_dir / "model.safetensors").symlink_to(path / "model.safetensors")
    unscaled, _ = load_model(unscaled_dir)
    diff = np.abs(np.array(unscaled(mx.array([ids]))[0]) - reference_logits(ref, ids)).max()
    assert diff > 100 * ATOL


def variant(path: Path, name: str, **changes: Any) -> Any:
    """Our model from `path`'s weights under a config with `changes` (None removes a key)."""
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    folder = path.parent / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if not (folder / "model.safetensors").exists():
        (folder / "model.safetensors").symlink_to(path / "model.safetensors")
    return load_model(folder)[0]


def test_sliding_window_is_exercised(checkpoints: dict[str, Path]) -> None:
    """Without its window the windowed model must leave parity, so the parity test can fail."""
    path = checkpoints["mistral"]
    ids = prompts()[-1]  # 40 tokens, past the 12-position window
    windowless = variant(path, "mistral_windowless", sliding_window=None)
    assert windowless.sliding_window is None
    got = np.array(windowless(mx.array([ids]))[0])
    expected = reference_logits(load_reference(path), ids)
    np.testing.assert_allclose(got[:SLIDING_WINDOW], expected[:SLIDING_WINDOW], atol=ATOL)
    assert np.abs(got - expected).max() > 100 * ATOL


PHI3_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": PHI3_SHORT_FACTOR,
    "long_factor": PHI3_LONG_FACTOR,
    "original_max_position_embeddings": 1,
    "attention_factor": 1.2,
    "partial_rotary_factor": 0.75,
}
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}
# Each config feature the parity tests rely on, changed: parity must break.
FEATURES = {
    "phi3-long-factors": (
        "phi3",
        {"rope_parameters": {**PHI3_ROPE, "long_factor": PHI3_SHORT_FACTOR}},
    ),
    "phi3-attention-factor": ("phi3", {"rope_parameters": {**PHI3_ROPE, "attention_factor": 1.0}}),
    "gemma2-attn-softcap": ("gemma2", {"attn_logit_softcapping": None}),
    "gemma2-final-softcap": ("gemma2", {"final_logit_softcapping": None}),
    "gemma2-query-scalar": ("gemma2", {"query_pre_attn_scalar": 16}),
    "gemma2-layer-types": ("gemma2", {"layer_types": ["full_attention"] * 2}),
    "gemma3-local-rope": (
        "gemma3_text",
        {"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": {"rope_theta": 1e4}}},
    ),
    "gemma3-global-rope": (
        "gemma3_text",
        {"rope_parameters": {**GEMMA3_ROPE, "full_attention": {"rope_theta": 1e6}}},
    ),
    "gemma3-layer-types": ("gemma3_text", {"layer_types": ["sliding_attention"] * 2}),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_config_features_are_exercised(checkpoints: dict[str, Path], feature: str) -> None:
    name, changes = FEATURES[feature]
    path = checkpoints[name]
    ids = prompts()[-1]
    changed = variant(path, feature, **changes)
    diff = np.abs(
        np.array(changed(mx.array([ids]))[0]) - reference_logits(load_reference(path), ids)
    )
    assert diff.max() > 100 * ATOL


# The same models as transformers 4 wrote their configs (no rope_parameters / layer_types).
OLD_CONFIGS = {
    "phi3": {
        "rope_parameters": None,
        "rope_scaling": {
            "type": "su",
            "short_factor": PHI3_SHORT_FACTOR,
            "long_factor": PHI3_LONG_FACTOR,
            "attention_factor": 1.2,
        },
    },
    "gemma3_text": {
        "rope_parameters": None,
        "layer_types": None,
        "rope_theta": 1e6,
        "rope_local_base_freq": 100.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
}


@pytest.mark.parametrize("name", list(OLD_CONFIGS))
def test_transformers4_configs_match(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    ids = prompts()[-1]
    old = variant(path, f"{name}_v4", **OLD_CONFIGS[name])
    got = np.array(old(mx.array([ids]))[0])
    np.testing.assert_allclose(got, reference_logits(load_reference(path), ids), atol=ATOL)


def test_window_mask_positions() -> None:
    """Per-row decode offsets and a chunk's int offset see exactly the last `window` positions."""
    decode = np.array(window_mask(None, mx.array([3, 20]), 1, 24, 8, mx.float32))  # (2, 1, 1, 24)
    assert decode.shape == (2, 1, 1, 24)
    assert np.flatnonzero(decode[0, 0, 0] == 0).tolist() == list(range(0, 4))
    assert np.flatnonzero(decode[1, 0, 0] == 0).tolist() == list(range(13, 21))
    chunk = np.array(window_mask("causal", 20, 4, 24, 8, mx.float32))  # (1, 1, 4, 24)
    for i in range(4):
        assert np.flatnonzero(chunk[0, 0, i] == 0).tolist() == list(range(13 + i, 21 + i))
    caller = mx.where(mx.arange(24) < 18, 0.0, -mx.inf)[None, None, None, :]  # hides 18..23
    narrowed = np.array(window_mask(caller, mx.array([20]), 1, 24, 8, mx.float32))
    assert np.flatnonzero(narrowed[0, 0, 0] == 0).tolist() == list(range(13, 18))
    assert window_mask("causal", 0, 8, 8, 8, mx.float32) == "causal"  # within the window


def test_llama3_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(llama3_inv_freq(64, 500000.0, scaling), expected.numpy(), rtol=1e-6)


def test_chunked_prefill_equals_one_pass(loaded: dict[str, tuple[Any, Any]]) -> None:
    """A second chunk with the default mask attends causally to cache + itself."""
    ours, _ = loaded["qwen3"]
    ids = prompts()[-1]
    whole = np.array(ours(mx.array([ids]), cache=ours.make_cache()))
    cache = ours.make_cache()
    first = np.array(ours(mx.array([ids[:23]]), cache=cache))
    second = np.array(ours(mx.array([ids[23:]]), cache=cache))
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5)


WINDOWED = ["mistral", "phi3", "gemma2", "gemma3_text"]


@pytest.mark.parametrize("name", WINDOWED)
def test_windowed_chunks_and_decode_match_transformers(
    name: str, loaded: dict[str, tuple[Any, Any]]
) -> None:
    """Chunks of 5 then single tokens through the cache, 40 positions past a 12 window: logits."""
    ours, ref = loaded[name]
    assert ours.sliding_window == SLIDING_WINDOW
    ids = prompts()[-1]
    cache = ours.make_cache()
    pieces = [ids[i : i + 5] for i in range(0, 20, 5)] + [[t] for t in ids[20:]]
    got = np.concatenate([np.array(ours(mx.array([p]), cache=cache)[0]) for p in pieces])
    np.testing.assert_allclose(got, reference_logits(ref, ids), atol=ATOL)


def test_explicit_mask_equals_default(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = loaded["llama"]
    ids = prompts()[1]
    n = len(ids)
    additive = mx.where(mx.tril(mx.ones((n, n), dtype=mx.bool_)), 0.0, -mx.inf)[None, None]
    np.testing.assert_allclose(
        np.array(ours(mx.array([ids]), mask=additive)),
        np.array(ours(mx.array([ids]))),
        atol=1e-5,
    )


def test_last_only_returns_the_last_row(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = loaded["qwen2"]
    ids = mx.array([prompts()[1]])
    last = ours(ids, last_only=True)
    assert last.shape == (1, 1, VOCAB)
    np.testing.assert_allclose(np.array(last[0, 0]), np.array(ours(ids)[0, -1]), atol=1e-5)


def test_rope_accepts_per_row_offsets(loaded: dict[str, tuple[Any, Any]]) -> None:
    """An (B,) array offset rotates each row as its own int offset would."""
    ours, _ = loaded["llama3_scaled"]
    rope = ours.layers[0].self_attn.rope
    x = mx.random.normal((2, ours.args.num_attention_heads, 3, ours.head_dim), key=mx.random.key(0))
    batched = rope(x, offset=mx.array([5, 70], dtype=mx.int32))
    for row, offset in enumerate((5, 70)):
        single = rope(x[row : row + 1], offset=offset)
        np.testing.assert_allclose(np.array(batched[row]), np.array(single[0]), atol=1e-5)


def test_batched_rows_match_single(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = loaded["qwen2"]
    a, b = prompts()[1], prompts(seed=5)[1]
    both = np.array(ours(mx.array([a, b])))
    for row, ids in enumerate((a, b)):
        np.testing.assert_allclose(both[row], np.array(ours(mx.array([ids]))[0]), atol=1e-5)


def test_kv_cache_grows_past_a_step(loaded: dict[str, tuple[Any, Any]]) -> None:
    """Decoding across the 256-position boundary keeps what the cache held."""
    ours, ref = loaded["mistral"]
    ids = prompts()[2] * 7  # 280 tokens
    cache = ours.make_cache()
    assert cache[0].offset == 0 and cache[0].nbytes == 0
    ours(mx.array([ids[:250]]), cache=cache)
    for token in ids[250:]:
        logits = ours(mx.array([[token]]), cache=cache)
    assert cache[0].offset == 280
    assert cache[0].keys is not None and cache[0].keys.shape[2] == 2 * KVCache.step
    got = np.array(logits[0, -1])
    np.testing.assert_allclose(got, reference_logits(ref, ids)[-1], atol=ATOL)


def test_interface_properties(loaded: dict[str, tuple[Any, Any]]) -> None:
    ours, _ = loaded["qwen3"]
    assert ours.num_layers == len(ours.layers) == 2
    assert ours.n_kv_heads == 2
    assert ours.head_dim == 16
    cache = ours.make_cache()
    assert len(cache) == ours.num_layers


def test_tinystories_greedy_matches_transformers() -> None:
    from tokenizers import Tokenizer

    model, info = load_model(TINYSTORIES)
    assert info.context_length == 512
    ref = load_reference(TINYSTORIES)
    tokenizer = Tokenizer.from_file(str(TINYSTORIES / "tokenizer.json"))
    for text in ("Once upon a time", "Lily and Ben", "The cat"):
        ids = tokenizer.encode(text, add_special_tokens=True).ids
        assert ids[0] == 1  # BOS
        ours = greedy_ours(model, ids, 200)
        assert ours == greedy_reference(ref, ids, 200)
    first = greedy_ours(model, tokenizer.encode("Once upon a time").ids, 12)
    assert tokenizer.decode(first).startswith(", there was a little girl named Lily.")


@pytest.mark.parametrize(
    "scaling", [{"rope_type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}]
)
def test_other_rope_scalings_match_transformers(tmp_path: Path, scaling: dict[str, Any]) -> None:
    path = build_llama(tmp_path / "m", vocab_size=VOCAB, rope_scaling=scaling)
    ours, _ = load_model(path)
    ids = prompts()[-1]
    got = np.array(ours(mx.array([ids]))[0])
    np.testing.assert_allclose(got, reference_logits(load_reference(path), ids), atol=ATOL)


def test_phi3_default_attention_factor_matches_transformers(tmp_path: Path) -> None:
    """Without an explicit attention_factor: sqrt(1 + ln(512 / 4) / ln 4), prompts past 4."""
    path = build_phi3(
        tmp_path / "m", vocab_size=VOCAB, original_max_position_embeddings=4, attention_factor=None
    )
    ours, _ = load_model(path)
    ref = load_reference(path)
    for ids in prompts():  # 5, 17 and 40 tokens: transformers takes the long factors for all
        got = np.array(ours(mx.array([ids]))[0])
        np.testing.assert_allclose(got, reference_logits(ref, ids), atol=ATOL)
