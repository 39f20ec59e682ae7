"""`ffai chat` as a person at a terminal drives it: a real pseudo-terminal, a real worker.

Ctrl-C is the byte 0x03 typed into the terminal, so the kernel's line discipline
sends SIGINT to the chat's foreground process group, as it does for a user.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client.cli_chat import drop_oldest_exchange
from ffai_client.types import ChatMessage

FFAI = str(Path(sys.executable).parent / "ffai")
CTRL_C, CTRL_D = b"\x03", b"\x04"
# Replies long enough to be still streaming when the test presses Ctrl-C.
MAX_TOKENS = 400
LONG_REPLY = ["--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--ignore-eos"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FFAI_ENDPOINT"}
    env["TERM"] = "dumb"
    return env


def _take_terminal() -> None:
    # Runs in the child after setsid(): make the pty (its stdin) the controlling terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command on its own pseudo-terminal: type into it, read what it shows."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            list(args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=_env(),
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.screen = ""
        self._pos = 0  # where the next expect() starts looking

    def _read(self, timeout: float) -> bool:
        """Read what shows within `timeout`; False once the terminal is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.screen += data.decode(errors="replace")
        return bool(data)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until `pattern` (a regex, `.` spans lines) shows after the last match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.DOTALL)
        while True:
            match = regex.search(self.screen, self._pos)
            if match:
                self._pos = match.end()
                return match
            left = deadline - time.monotonic()
            closed = not self._read(min(max(left, 0), 0.2))
            if left <= 0 or (closed and self.proc.poll() is not None):
                raise AssertionError(f"{pattern!r} never showed; the screen:\n{self.screen}")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit, reading the rest of the screen meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running after {timeout} s; screen:\n{self.screen}")
            self._read(0.1)
        while self._read_more():
            pass
        return self.proc.returncode

    def _read_more(self) -> bool:
        ready, _, _ = select.select([self.master], [], [], 0.05)
        return bool(ready) and self._read(0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def chat(terminals: list[Terminal], worker: WorkerProcess, *flags: str) -> Terminal:
    terminal = Terminal(FFAI, "chat", "--endpoint", worker.endpoint, *flags)
    terminals.append(terminal)
    terminal.expect(r"> $")
    return terminal


def ask(terminal: Terminal, line: str) -> None:
    """Type a line at the prompt and wait until the first characters of the reply show.

    The terminal echoes what is typed at once, so type only once the prompt shows.
    """
    terminal.type(line.encode() + b"\r")
    terminal.expect(re.escape(line) + r"\r\n\s*\S{3}")


def stop_reply(terminal: Terminal, worker: WorkerProcess) -> None:
    """Press Ctrl-C mid-reply; the worker is frozen meanwhile so the reply cannot end first."""
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        terminal.type(CTRL_C)
        time.sleep(0.3)
    finally:
        worker.proc.send_signal(signal.SIGCONT)


# -- Ctrl-C and Ctrl-D --------------------------------------------------------------------
def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(
    tinystories_worker: WorkerProcess, terminals: list[Terminal]
) -> None:
    terminal = chat(terminals, tinystories_worker, *LONG_REPLY)
    ask(terminal, "Tell me a story")
    stop_reply(terminal, tinystories_worker)
    # The count comes from the worker's `cancelled` final chunk: it got the cancel.
    stopped = terminal.expect(r"\r\nffai: reply stopped after (\d+) tokens\r\n> $")
    assert 0 < int(stopped.group(1)) < MAX_TOKENS, terminal.screen
    # The conversation goes on: the next question gets a whole reply, then the prompt.
    terminal.type(b"/stats\r")
    terminal.expect(r"generated: +\d+ tokens.*\r\n> $")
    ask(terminal, "And then?")
    terminal.expect(r"\r\n> $", timeout=60)
    terminal.type(b"/stats\r")
    stats = terminal.expect(r"prompt: +(\d+) tokens.*generated: +(\d+) tokens.*\r\n> $")
    prompt, generated = int(stats.group(1)), int(stats.group(2))
    # It ran to its end: max tokens, or the 512-token context full.
    assert generated == min(MAX_TOKENS, 512 - prompt), terminal.screen
    terminal.type(CTRL_D)
    assert terminal.wait() == 0, terminal.screen
    assert "Traceback" not in terminal.screen


def test_ctrl_c_at_the_prompt_exits_cleanly(
    tinystories_worker: WorkerProcess, terminals: list[Terminal]
) -> None:
    terminal = chat(terminals, tinystories_worker)
    terminal.type(CTRL_C)
    assert terminal.wait(timeout=10) in (0, 130), terminal.screen
    assert "Traceback" not in terminal.screen and "Aborted" not in terminal.screen


def test_ctrl_c_after_a_stopped_reply_exits_cleanly(
    tinystories_worker: WorkerProcess, terminals: list[Terminal]
) -> None:
    # The reply's own SIGINT handler must be gone once the prompt is back.
    terminal = chat(terminals, tinystories_worker, *LONG_REPLY)
    ask(terminal, "Tell me a story")
    stop_reply(terminal, tinystories_worker)
    terminal.expect(r"ffai: reply stopped.*\r\n> $")
    terminal.type(CTRL_C)
    assert terminal.wait(timeout=10) in (0, 130), terminal.screen
    assert "Traceback" not in terminal.screen


def test_ctrl_d_at_the_prompt_exits_zero(
    tinystories_worker: WorkerProcess, terminals: list[Terminal]
) -> None:
    terminal = chat(terminals, tinystories_worker)
    terminal.type(CTRL_D)
    assert terminal.wait(timeout=10) == 0, terminal.screen
    assert "Traceback" not in terminal.screen


# -- errors after partial text ------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_error_after_partial_text_starts_a_new_line(
    command: str, fresh_worker_factory: type[WorkerProcess], terminals: list[Terminal]
) -> None:
    worker = fresh_worker_factory(TINYSTORIES)
    flags = ["--endpoint", worker.endpoint, "--timeout", "1", *LONG_REPLY]
    if command == "generate":
        terminal = Terminal(FFAI, "generate", *flags, "Once upon a time")
        terminals.append(terminal)
        terminal.expect(r"\S{3}")
    else:
        terminal = chat(terminals, worker, *flags[2:])
        ask(terminal, "Tell me a story")
    worker.proc.send_signal(signal.SIGSTOP)  # the text stops mid-line...
    time.sleep(0.2)
    worker.proc.kill()  # ...and the worker dies
    assert terminal.wait() == 3, terminal.screen
    # The message has a line of its own, right after the partial text.
    assert re.search(r"\nffai: worker unavailable", terminal.screen), terminal.screen
    assert "Traceback" not in terminal.screen


# -- a conversation longer than the context ---------------------------------------------
def run_chat(
    worker: WorkerProcess, lines: list[str], *flags: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FFAI, "chat", "--endpoint", worker.endpoint, *flags],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )


@pytest.fixture(scope="module")
def small_context_worker() -> Iterator[WorkerProcess]:
    worker = WorkerProcess(TINYSTORIES, "--max-prompt-tokens", "120")
    yield worker
    worker.stop()


def prompt_tokens(stats_block: str) -> int:
    match = re.search(r"^  prompt: +(\d+) tokens", stats_block, flags=re.MULTILINE)
    assert match is not None, stats_block
    return int(match.group(1))


def test_overflowing_history_drops_the_oldest_exchanges(
    small_context_worker: WorkerProcess,
) -> None:
    questions = ["Tell me a story", "What happened next?", "Who was there?", "Why?", "The end?"]
    result = run_chat(
        small_context_worker,
        [*questions, "/stats"],
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        "--ignore-eos",
        "--system",
        "You tell short stories.",
    )
    assert result.returncode == 0, result.stderr
    assert "prompt_too_long" not in result.stderr
    notices = result.stderr.count("dropped its oldest exchange")
    assert notices >= 2, result.stderr  # 5 turns of 40+ tokens cannot fit 120
    assert result.stderr.count("\n") == notices  # one line each, nothing else
    # Piped, input() echoes "> " to stdout: "> r1\n> r2\n ... > [STATS]...\n> ".
    replies = result.stdout.removeprefix("> ").removesuffix("\n> ").split("\n> ")
    assert len(replies) == len(questions) + 1, result.stdout  # every question got a reply
    assert all(reply.strip() for reply in replies[: len(questions)]), result.stdout
    # The last question was sent trimmed to the worker's limit, system message kept.
    assert prompt_tokens(replies[-1]) <= 120


def test_a_message_too_long_alone_is_refused_and_the_chat_goes_on(
    small_context_worker: WorkerProcess,
) -> None:
    result = run_chat(
        small_context_worker,
        ["Hi", "word " * 200, "Hello"],
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        "--ignore-eos",
    )
    assert result.returncode == 0, result.stderr
    assert "error prompt_too_long" in result.stderr and "message not kept" in result.stderr
    replies = [r for r in result.stdout.split("> ") if r]
    assert len(replies) == 2 and all(r.strip() for r in replies), result.stdout


# -- the trimming rule itself ------------------------------------------------------------
def test_drop_oldest_exchange_keeps_the_system_message_and_the_question() -> None:
    system = ChatMessage("system", "s")
    history = [
        system,
        ChatMessage("user", "u1"),
        ChatMessage("assistant", "a1"),
        ChatMessage("user", "u2"),
        ChatMessage("assistant", "a2"),
        ChatMessage("user", "u3"),
    ]
    assert drop_oldest_exchange(history, keep=1)
    assert [m.content for m in history] == ["s", "u2", "a2", "u3"]
    assert drop_oldest_exchange(history, keep=1)
    assert [m.content for m in history] == ["s", "u3"]
    assert not drop_oldest_exchange(history, keep=1)
    assert [m.content for m in history] == ["s", "u3"]
