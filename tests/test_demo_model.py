"""The built-in demo model: built offline and deterministically, served with no --model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import WorkerProcess

from ffai_client import ChatMessage, Client, GenerationParameters
from ffai_worker.demo_model import DEMO_NAME, WORDS, ensure_demo_model


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = ensure_demo_model(tmp_path / "a")
    b = ensure_demo_model(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert ensure_demo_model(a) == a  # a second call reuses the folder


def test_served_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    worker = WorkerProcess(None)
    try:
        assert "output is noise" in worker.log()
        assert (tmp_path / "ffai" / DEMO_NAME / "model.safetensors").exists()
        with Client(worker.endpoint, timeout=30) as client:
            params = GenerationParameters(max_tokens=24, seed=7, stop_on_eos=False)
            result = client.generate("Once upon a time", parameters=params)
            assert result.finish_reason == "length"
            assert len(result.generated_tokens) == 24
            # Only whole words can win a draw, so the noise is readable.
            assert result.text.split() and set(result.text.split()) <= set(WORDS)
            chat = client.generate(messages=[ChatMessage("user", "Hi")], parameters=params)
            assert len(chat.generated_tokens) == 24
            rendered = client.render([ChatMessage("user", "Hi")])
    finally:
        worker.stop()
    # The oracle for the template: transformers on the folder the worker built.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "ffai" / DEMO_NAME))
    convo = [{"role": "user", "content": "Hi"}]
    assert rendered.text == hf.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=True
    )
    ids = hf.apply_chat_template(convo, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(rendered.tokens) == list(ids)
