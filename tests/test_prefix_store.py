"""`--prompt-cache-dir`: the prefix cache survives a restart, and bad files never crash a worker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import TINYSTORIES, WorkerProcess

import ffai_worker  # noqa: F401 - BLAS first
from ffai_client import Client
from ffai_client.types import GenerationParameters
from ffai_worker.engine import Engine, EngineConfig

GREEDY = GenerationParameters(temperature=0.0, max_tokens=30, stop_on_eos=False)
STORY = "Once upon a time there was a little dog named Max who liked to play in the big green park"
FOLLOW = STORY + " with his friends"


def engine_in(folder: Path, cache_bytes: int | None = None) -> Engine:
    config = EngineConfig(prompt_cache_bytes=cache_bytes, prompt_cache_dir=str(folder))
    return Engine.load(TINYSTORIES, config=config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], int]:
    """A folder holding one save (STORY and its reply), FOLLOW's cold tokens, tokens saved."""
    folder = tmp_path_factory.mktemp("prompt-cache")
    first = engine_in(folder)
    first.generate(STORY, parameters=GREEDY)
    tokens = first.save_prompt_cache()
    cold = Engine.load(TINYSTORIES, config=EngineConfig(prompt_cache_bytes=0))
    return folder, cold.generate(FOLLOW, parameters=GREEDY).generated_tokens, tokens


def copy_of(saved_folder: Path, into: Path) -> Path:
    for f in saved_folder.iterdir():
        (into / f.name).write_bytes(f.read_bytes())
    return into


def test_a_restart_keeps_the_cache_and_its_tokens(saved: tuple[Path, list[int], int]) -> None:
    folder, want, written = saved
    assert written == len(Engine.load(TINYSTORIES).tokenize(STORY)) + 30
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".safetensors"]
    second = engine_in(folder)
    assert second.restored_prompt_tokens == written
    hot = second.generate(FOLLOW, parameters=GREEDY)
    assert hot.stats.cached_prompt_tokens == len(second.tokenize(STORY))
    assert hot.generated_tokens == want


def test_loading_obeys_the_byte_bound(saved: tuple[Path, list[int], int], tmp_path: Path) -> None:
    folder = copy_of(saved[0], tmp_path)
    probe = Engine.load(TINYSTORIES, config=EngineConfig(prompt_cache_bytes=0))
    small = engine_in(folder, cache_bytes=10 * probe.cache.bytes_per_token)
    assert small.restored_prompt_tokens <= 10 and small.prefix.bytes <= small.prefix.capacity_bytes


@pytest.mark.parametrize("damage", ["truncated", "foreign", "garbage-index", "wrong-shape"])
def test_bad_files_are_skipped_with_a_warning(
    saved: tuple[Path, list[int], int],
    tmp_path: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = copy_of(saved[0], tmp_path)
    (tensors,) = folder.glob("*.safetensors")
    (index,) = folder.glob("*.json")
    data = json.loads(index.read_text())
    if damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "foreign":
        data["identity"]["dtype"] = "mlx.core.float16"
        index.write_text(json.dumps(data))
    elif damage == "garbage-index":
        index.write_text("{not json")
    else:
        data["nodes"][0]["tokens"] = data["nodes"][0]["tokens"][:-1]
        index.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="ffai_worker"):
        engine = engine_in(folder)
    assert engine.restored_prompt_tokens == 0 and engine.prefix.bytes == 0
    assert "prompt cache" in caplog.text and "skipped" in caplog.text
    result = engine.generate(FOLLOW, parameters=GREEDY)  # the worker works on
    assert result.generated_tokens == saved[1] and result.stats.cached_prompt_tokens == 0


def test_a_served_worker_saves_at_shutdown_and_reads_back_at_start(tmp_path: Path) -> None:
    args = ("--prompt-cache-dir", str(tmp_path))
    first = WorkerProcess(TINYSTORIES, *args)
    try:
        with Client(first.endpoint) as client:
            cold = client.generate(FOLLOW, parameters=GREEDY)
    finally:
        assert first.stop() == 0
    assert "tokens saved to" in first.log()
    second = WorkerProcess(TINYSTORIES, *args)
    try:
        assert f"{len(cold.generated_tokens) + cold.stats.prompt_tokens} tokens restored" in (
            second.log()
        )
        with Client(second.endpoint) as client:
            hot = client.generate(FOLLOW, parameters=GREEDY)
    finally:
        second.stop()
    assert hot.stats.cached_prompt_tokens == cold.stats.prompt_tokens - 1
    assert hot.generated_tokens == cold.generated_tokens
