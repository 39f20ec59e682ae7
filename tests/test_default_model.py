"""The built-in model: the real tinystories-260k, shipped in the package and served with no --model.

The oracle is transformers on the shipped files: its greedy story is the one the
worker must print.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import checkpoints
import pytest
from conftest import REPO, TINYSTORIES, WorkerProcess

from ffai_client import ChatMessage, Client
from ffai_worker.models.builtin import BUILTIN_MODEL_DIR

BIN = Path(sys.executable).parent
PROMPT = "Once upon a time"
STORY_START = ", there was a little girl named Lily"  # shared/README's greedy continuation
N_TOKENS = 40
SHIPPED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "LICENSE",
}


@pytest.fixture(scope="module")
def oracle_story() -> str:
    """transformers' greedy continuation of PROMPT on the shipped folder, decoded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL_DIR))
    prompt = tok(PROMPT)["input_ids"]
    model = checkpoints.load_reference(BUILTIN_MODEL_DIR)
    ids = checkpoints.greedy_reference(model, prompt, N_TOKENS)
    full = tok.decode(prompt + ids, skip_special_tokens=True)
    assert full.startswith(PROMPT)
    return str(full[len(PROMPT) :])


def test_shipped_files_are_the_real_model_byte_for_byte() -> None:
    assert {p.name for p in BUILTIN_MODEL_DIR.iterdir()} == SHIPPED
    for name in SHIPPED:
        shipped = (BUILTIN_MODEL_DIR / name).read_bytes()
        assert shipped == (TINYSTORIES / name).read_bytes(), name
    licence = (BUILTIN_MODEL_DIR / "LICENSE").read_text()
    assert "MIT License" in licence and "karpathy/llama2.c" in licence


def test_wheel_ships_the_model(tmp_path: Path) -> None:
    """A non-editable install gets the model: the built wheel holds every file."""
    # Build from a copy of the sources: an in-tree build/ could hold stale files.
    src = tmp_path / "src"
    for name in ("ffai_client", "ffai_worker"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(
        [*build, "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("ffai-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        weights = zf.read("ffai_worker/default_model/model.safetensors")
    assert {f"ffai_worker/default_model/{name}" for name in SHIPPED} <= names
    assert weights == (TINYSTORIES / "model.safetensors").read_bytes()


def test_oracle_tells_the_known_story(oracle_story: str) -> None:
    assert oracle_story.startswith(STORY_START), oracle_story


def test_served_by_default_and_ffai_generate_prints_the_story(oracle_story: str) -> None:
    worker = WorkerProcess(None)
    try:
        assert "built-in model tinystories-260k" in worker.log()
        generate = [str(BIN / "ffai"), "generate", "--endpoint", worker.endpoint, "--timeout", "60"]
        options = ["--temperature", "0", "--max-tokens", str(N_TOKENS), "--ignore-eos", PROMPT]
        result = subprocess.run([*generate, *options], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout == oracle_story + "\n"
        with Client(worker.endpoint, timeout=30) as client:
            info = client.info()
            rendered = client.render([ChatMessage("user", "Hi")])
    finally:
        worker.stop()
    assert Path(info.model).resolve() == BUILTIN_MODEL_DIR
    # The shipped chat template renders as transformers renders it.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL_DIR))
    convo = [{"role": "user", "content": "Hi"}]
    assert rendered.text == hf.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=True
    )


def test_in_process_generate_uses_the_built_in_model(oracle_story: str) -> None:
    args = ["generate", "--temperature", "0", "--max-tokens", str(N_TOKENS), "--ignore-eos", PROMPT]
    result = subprocess.run(
        [str(BIN / "ffai-worker"), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "built-in model tinystories-260k" in result.stderr
    assert result.stdout == oracle_story + "\n"
