"""The two console scripts, run as a user runs them: `ffai` against a real worker, `ffai-worker`.

Expected text comes from the in-process engine on the same model; exit codes are
the documented ones (0 ok, 1 request error, 2 usage error, 3 worker unavailable).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, TINYSTORIES, WorkerProcess

from ffai_client import ChatMessage, GenerationParameters, GenerationResult

BIN = Path(sys.executable).parent
FFAI = str(BIN / "ffai")
FFAI_WORKER = str(BIN / "ffai-worker")
PROMPT = "Once upon a time"
GREEDY_20 = GenerationParameters(temperature=0.0, max_tokens=20)


def run(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a console script; FFAI_ENDPOINT is dropped so only --endpoint counts."""
    env = {k: v for k, v in os.environ.items() if k != "FFAI_ENDPOINT"}
    return subprocess.run(
        list(args), input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def engine() -> Any:
    import ffai_worker  # noqa: F401  (preloads BLAS before mlx)
    from ffai_worker.engine import Engine

    return Engine.load(TINYSTORIES)


def stats_generated(stderr: str) -> int:
    """The generated-token count of the one [STATS] block in `stderr`."""
    assert stderr.count("[STATS]") == 1, stderr
    match = re.search(r"^  generated:\s+(\d+) tokens$", stderr, flags=re.MULTILINE)
    assert match is not None, stderr
    return int(match.group(1))


# -- no worker needed ---------------------------------------------------------------------
@pytest.mark.parametrize("script", [FFAI, FFAI_WORKER])
def test_help_exits_zero(script: str) -> None:
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: "), result.stdout
    assert "generate" in result.stdout  # both CLIs list their generate command


MLX_FREE_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class NoMLX(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mlx" or name.startswith("mlx."):
                raise ImportError(f"mlx is blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, NoMLX())
    assert not any(m == "mlx" or m.startswith("mlx.") for m in sys.modules), "mlx preloaded"

    import ffai_client
    names = [
        info.name
        for info in pkgutil.walk_packages(ffai_client.__path__, "ffai_client.")
    ]
    for name in names:
        importlib.import_module(name)
    import ffai_client.cli

    client = ffai_client.Client("ipc:///nonexistent/ffai-no-mlx.sock")
    client.close()
    ffai_client.AsyncClient("ipc:///nonexistent/ffai-no-mlx.sock")

    leaked = sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx."))
    assert not leaked, leaked
    assert "ffai_worker" not in sys.modules
    # The blocker is live: the worker's engine, which needs mlx, cannot be imported.
    try:
        import ffai_worker.engine.core
    except ImportError as exc:
        assert "mlx is blocked" in str(exc), exc
    else:
        raise AssertionError("the mlx blocker let ffai_worker.engine.core import")
    print(" ".join(sorted(names)))
    """
)


def test_client_package_never_imports_mlx() -> None:
    result = run(sys.executable, "-c", MLX_FREE_SCRIPT)
    assert result.returncode == 0, result.stderr
    # Every module of the package (subpackages too) was imported, not just its __init__.
    root = REPO / "ffai_client"
    on_disk = {
        ".".join(("ffai_client", *f.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for f in root.rglob("*.py")
    }
    assert set(result.stdout.split()) == on_disk - {"ffai_client"}


def test_unavailable_worker_exits_3() -> None:
    with tempfile.TemporaryDirectory(prefix="ffai-test-") as d:
        endpoint = f"ipc://{d}/nobody.sock"
        for args in (["ping"], ["info"], ["generate", PROMPT]):
            result = run(FFAI, *args, "--endpoint", endpoint, "--timeout", "0.5")
            assert result.returncode == 3, (args, result.stderr)
            assert "worker unavailable" in result.stderr
            assert result.stdout.strip() == ""


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["generate"],  # missing PROMPT
        ["generate", "--max-tokens", "zero", PROMPT],
        ["generate", "--top-p", "5", PROMPT],  # rejected before any request is sent
        ["ping", "--timeout", "soon"],
    ],
)
def test_usage_error_exits_2(args: list[str]) -> None:
    result = run(FFAI, *args)
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr or "Error:" in result.stderr


# -- against a real worker ----------------------------------------------------------------
def test_ping_and_info(tinystories_worker: WorkerProcess) -> None:
    import json

    endpoint = tinystories_worker.endpoint
    ping = run(FFAI, "ping", "--endpoint", endpoint)
    assert ping.returncode == 0, ping.stderr
    assert re.fullmatch(r"pong in [\d.]+ ms: running \d+, waiting \d+\n", ping.stdout)
    info = run(FFAI, "info", "--endpoint", endpoint)
    assert info.returncode == 0, info.stderr
    reply = json.loads(info.stdout)
    assert reply["model"] == str(TINYSTORIES)
    assert reply["architecture"] == "llama.Model"
    assert reply["context_length"] == 512
    assert reply["has_chat_template"] is True


def test_generate_prints_the_engine_text(tinystories_worker: WorkerProcess, engine: Any) -> None:
    expected = engine.generate(PROMPT, parameters=GREEDY_20)
    assert expected.text.startswith(", there was a little girl named Lily.")
    result = run(
        FFAI,
        "generate",
        "--endpoint",
        tinystories_worker.endpoint,
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--stats",
        PROMPT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert stats_generated(result.stderr) == len(expected.generated_tokens)


def test_generate_without_stats_prints_no_stats(tinystories_worker: WorkerProcess) -> None:
    endpoint = tinystories_worker.endpoint
    result = run(FFAI, "generate", "--endpoint", endpoint, "--max-tokens", "3", PROMPT)
    assert result.returncode == 0, result.stderr
    assert "[STATS]" not in result.stderr and "[STATS]" not in result.stdout


def test_generate_logprobs_and_response_format(
    tinystories_worker: WorkerProcess, engine: Any
) -> None:
    endpoint = tinystories_worker.endpoint
    params = GenerationParameters(temperature=0.0, max_tokens=5, logprobs=2)
    expected = engine.generate(PROMPT, parameters=params)
    args = ["--temperature", "0", "--max-tokens", "5", "--logprobs", "2"]
    result = run(FFAI, "generate", "--endpoint", endpoint, *args, PROMPT)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected.logprobs or ()) == 5
    for line, entry in zip(lines, expected.logprobs or (), strict=True):
        assert line.split()[0] == f"{entry.logprob:.4f}" and f"({entry.token})" in line
        assert line.count("|") == 1 and line.count(", ") >= 1  # two alternatives
    fmt = '{"type": "choice", "choices": ["dragon", "castle"]}'
    chosen = run(FFAI, "generate", "--endpoint", endpoint, "--response-format", fmt, PROMPT)
    assert chosen.returncode == 0 and chosen.stdout.strip() in ("dragon", "castle"), chosen
    bad = run(FFAI, "generate", "--endpoint", endpoint, "--response-format", "{nope", PROMPT)
    assert bad.returncode == 2 and "response-format" in bad.stderr


def test_request_error_exits_1(tinystories_worker: WorkerProcess) -> None:
    endpoint = tinystories_worker.endpoint
    too_long = "word " * 600  # tinystories' context is 512 tokens
    result = run(FFAI, "generate", "--endpoint", endpoint, too_long)
    assert result.returncode == 1, result.stderr
    assert "prompt_too_long" in result.stderr
    assert result.stdout.strip() == ""
    # The worker is unharmed and still answers the same CLI.
    assert run(FFAI, "ping", "--endpoint", endpoint).returncode == 0


def test_chat_through_stdin(tinystories_worker: WorkerProcess, engine: Any) -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=12)
    first, second = "Hi there", "Tell me a story"

    def reply(*history: ChatMessage) -> GenerationResult:
        result: GenerationResult = engine.generate(messages=list(history), parameters=params)
        return result

    r1 = reply(ChatMessage("user", first))
    r2 = reply(ChatMessage("user", second)).text
    r2_with_history = reply(
        ChatMessage("user", first), ChatMessage("assistant", r1.text), ChatMessage("user", second)
    ).text
    # Otherwise the transcript could not tell whether /reset dropped the history.
    assert r2 != r2_with_history
    r3 = reply(
        ChatMessage("user", second), ChatMessage("assistant", r2), ChatMessage("user", second)
    ).text

    lines = [first, "/stats", "/reset", second, "", second]
    result = run(
        FFAI,
        "chat",
        "--endpoint",
        tinystories_worker.endpoint,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        stdin="\n".join(lines) + "\n",  # then EOF
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # input("> ") echoes its prompt to stdout when stdin is a pipe.
    assert out.startswith(f"> {r1.text}\n> [STATS]\n"), out
    stats_block, reset, rest = out.partition("\n> (conversation reset)\n")
    assert reset, out
    assert stats_generated(stats_block) == len(r1.generated_tokens)
    # After the reset: the fresh-conversation reply, then (the empty line is skipped) the
    # same question again, now with the post-reset exchange in the history.
    assert rest == f"> {r2}\n> > {r3}\n> ", out


def test_chat_system_message(tinystories_worker: WorkerProcess, engine: Any) -> None:
    params = GenerationParameters(temperature=0.0, max_tokens=8)
    system, user = "You tell stories about cats.", "Hello"
    expected = engine.generate(
        messages=[ChatMessage("system", system), ChatMessage("user", user)], parameters=params
    ).text
    without_system = engine.generate(messages=[ChatMessage("user", user)], parameters=params).text
    assert expected != without_system
    result = run(
        FFAI,
        "chat",
        "--endpoint",
        tinystories_worker.endpoint,
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--system",
        system,
        stdin=f"{user}\n/quit\nnever sent\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"> {expected}\n> "


# -- ffai-worker generate (in-process, no worker) -----------------------------------------
def test_worker_cli_generate_prints_the_engine_text(engine: Any) -> None:
    expected = engine.generate(PROMPT, parameters=GREEDY_20)
    result = run(
        FFAI_WORKER,
        "generate",
        "--model",
        str(TINYSTORIES),
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--stats",
        PROMPT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert stats_generated(result.stderr) == len(expected.generated_tokens)


def test_worker_cli_bad_model_is_a_clean_error(tmp_path: Path) -> None:
    result = run(FFAI_WORKER, "generate", "--model", str(tmp_path / "missing"), PROMPT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: "), result.stderr
