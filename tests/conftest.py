"""Shared fixtures: paths to ../shared, and real worker processes on temporary ipc endpoints."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINYSTORIES = SHARED / "models" / "tinystories-260k"
TOKENIZERS = SHARED / "tokenizers"
CHAT_TEMPLATES = SHARED / "chat_templates"

os.environ["HF_HUB_OFFLINE"] = "1"  # never download, even if the caller allowed it

# A shell without job control starts background commands (`pytest ... &`, some CI
# runners) with SIGINT ignored, and children inherit that: the tests that press Ctrl-C
# on a CLI would see it ignored. Tests run those CLIs as from an interactive shell.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    """A loopback TCP port nothing listens on (for a worker, a gateway, or a silent peer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class WorkerProcess:
    """A real `ffai-worker serve` subprocess bound to a private ipc socket."""

    def __init__(self, model: Path | str | None, *extra: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="ffai-test-")
        self.endpoint = f"ipc://{self.dir}/w.sock"
        args = [sys.executable, "-m", "ffai_worker.cli", "serve", "--endpoint", self.endpoint]
        if model is not None:
            args += ["--model", str(model)]
        self.log_path = Path(self.dir) / "worker.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*args, *extra], stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            if b"serving on" in self.log_path.read_bytes():
                return
            time.sleep(0.05)
        raise TimeoutError(f"worker did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with the real Llama 3 tokenizer and a 16k context: streams for seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("slow-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZERS / "llama3" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tinystories_worker() -> Iterator[WorkerProcess]:
    worker = WorkerProcess(TINYSTORIES, "--max-queue", "32", "--max-batch", "8")
    yield worker
    worker.stop()


@pytest.fixture
def fresh_worker_factory() -> Iterator[type[WorkerProcess]]:
    started: list[WorkerProcess] = []

    class Factory(WorkerProcess):
        def __init__(self, model: Path | str | None, *extra: str) -> None:
            super().__init__(model, *extra)
            started.append(self)

    yield Factory
    for worker in started:
        worker.stop(signal.SIGKILL)
