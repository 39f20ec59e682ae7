"""`ffai-worker` fails fast and helpfully: options, environment, endpoint checked before loading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_worker.cli import main

FFAI = str(Path(sys.executable).parent / "ffai")
LOAD_LINE = "ffai-worker: model "  # printed once the model has loaded
DEBUG = ("--log-level", "DEBUG")  # upper case: the choice ignores case


def serve(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """A `serve` expected to exit by itself (a refusal), with FFAI_ENDPOINT dropped."""
    base = {k: v for k, v in os.environ.items() if k != "FFAI_ENDPOINT"}
    return subprocess.run(
        [sys.executable, "-m", "ffai_worker.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def ffai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FFAI, *args], capture_output=True, text=True, timeout=30)


def all_options(group: click.Group, prefix: str = "ffai-worker") -> list[tuple[str, click.Option]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += all_options(command, f"{prefix} {name}")
        for param in command.params:
            if isinstance(param, click.Option):
                found.append((f"{prefix} {name}", param))
    return found


def test_every_option_has_help() -> None:
    options = all_options(main)
    assert len(options) >= 28  # serve and generate (its sampling flags too) at least
    missing = [f"{cmd} {opt.opts[0]}" for cmd, opt in options if not (opt.help or "").strip()]
    assert missing == []


def test_bad_log_level_is_a_usage_error_before_loading(tmp_path: Path) -> None:
    done = serve("--log-level", "bogus", "--endpoint", f"ipc://{tmp_path}/w.sock")
    assert done.returncode == 2, done.stderr
    assert "Invalid value for '--log-level'" in done.stderr
    assert "Traceback" not in done.stderr and LOAD_LINE not in done.stderr


def test_env_endpoint_uppercase_log_level_and_absolute_model(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/from-env.sock"
    stale = socket.socket(socket.AF_UNIX)  # a killed worker's leftover: a socket file, no listener
    stale.bind(str(tmp_path / "from-env.sock"))
    stale.close()
    base = {k: v for k, v in os.environ.items() if k != "FFAI_ENDPOINT"}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            # No --endpoint: FFAI_ENDPOINT decides. A relative model folder.
            [sys.executable, "-m", "ffai_worker.cli", "serve", "-m", "tinystories-260k", *DEBUG],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**base, "FFAI_ENDPOINT": endpoint},
            cwd=TINYSTORIES.parent,
        )
    try:
        deadline = time.monotonic() + 60
        while f"serving on {endpoint}" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        info = ffai("info", "--endpoint", endpoint)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["model"] == str(TINYSTORIES)  # absolute
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_taken_ipc_endpoint_fails_before_the_model_loads(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-model-here")
    # Control: on a free endpoint this model is what fails.
    free = serve("--endpoint", f"ipc://{tmp_path}/free.sock", "--model", missing)
    assert free.returncode == 1 and "already serving" not in free.stderr, free.stderr
    first = WorkerProcess(TINYSTORIES)
    try:
        started = time.monotonic()
        second = serve("--endpoint", first.endpoint, "--model", missing)
        elapsed = time.monotonic() - started
        assert second.returncode == 1, second.stderr
        assert f"another worker is already serving {first.endpoint}" in second.stderr
        assert LOAD_LINE not in second.stderr and missing not in second.stderr
        assert "Traceback" not in second.stderr
        assert elapsed < 30, elapsed  # generous: a start-up, never a model load
        # The first worker kept its socket and still answers.
        assert ffai("ping", "--endpoint", first.endpoint).returncode == 0
    finally:
        first.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback_binds_and_a_taken_tcp_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://[::1]:{port}"
    first = WorkerProcess(TINYSTORIES, "--endpoint", endpoint)  # the later --endpoint wins
    try:
        assert f"serving on {endpoint}" in first.log()
        ping = ffai("ping", "--endpoint", endpoint)
        assert ping.returncode == 0, ping.stderr
        second = serve("--endpoint", endpoint, "--model", str(tmp_path / "no-model-here"))
        assert second.returncode == 1, second.stderr
        assert f"cannot bind {endpoint}: the address is in use" in second.stderr
        assert LOAD_LINE not in second.stderr
    finally:
        first.stop()
