"""CurveZMQ over tcp://127.0.0.1 with a real worker: right keys work, wrong ones fail fast."""

from __future__ import annotations

import asyncio
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINYSTORIES, WorkerProcess, free_tcp_endpoint

from ffai_client import AsyncClient, AuthenticationFailed, CurveClientKeys, GenerationParameters

GREEDY = GenerationParameters(temperature=0, max_tokens=8)


def _keygen(directory: Path, name: str) -> tuple[Path, Path]:
    args = [sys.executable, "-m", "ffai_worker.cli", "keygen", "--dir", str(directory)]
    subprocess.run([*args, "--name", name], check=True, capture_output=True, timeout=60)
    return directory / f"{name}.key", directory / f"{name}.key_secret"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("curve")
    allowed = root / "allowed"
    allowed.mkdir()
    server_public, server_secret = _keygen(root, "worker")
    alice_public, alice_secret = _keygen(root, "alice")
    _, mallory_secret = _keygen(root, "mallory")
    (allowed / "alice.key").write_bytes(alice_public.read_bytes())
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "alice": alice_secret,
        "mallory": mallory_secret,
        "allowed": allowed,
    }


@pytest.fixture(scope="module")
def curve_worker(keys: dict[str, Path]) -> Iterator[WorkerProcess]:
    endpoint = free_tcp_endpoint()
    worker = WorkerProcess(
        TINYSTORIES,
        "--endpoint",
        endpoint,
        "--curve-secret",
        str(keys["server_secret"]),
        "--curve-clients",
        str(keys["allowed"]),
        "--log-level",
        "warning",
    )
    worker.endpoint = endpoint
    yield worker
    worker.stop()


def test_keygen_writes_a_private_secret(keys: dict[str, Path]) -> None:
    assert stat.S_IMODE(keys["server_secret"].stat().st_mode) == 0o600
    assert b"public-key" in keys["server_public"].read_bytes()
    assert b"secret-key" not in keys["server_public"].read_bytes()


def test_allowed_key_generates(curve_worker: WorkerProcess, keys: dict[str, Path]) -> None:
    curve = CurveClientKeys.load(str(keys["server_public"]), str(keys["alice"]))
    plain = WorkerProcess(TINYSTORIES)  # the same model without Curve: the reference text

    async def run(endpoint: str, curve: CurveClientKeys | None) -> str:
        async with AsyncClient(endpoint, curve=curve) as client:
            return (await client.generate("Once upon a time", parameters=GREEDY)).text

    try:
        assert asyncio.run(run(curve_worker.endpoint, curve)) == asyncio.run(
            run(plain.endpoint, None)
        )
    finally:
        plain.stop()
    assert "CurveZMQ (1 allowed client keys" in curve_worker.log()


@pytest.mark.parametrize("who", ["mallory", "plain", "wrong_server_key"])
def test_refused_fast(curve_worker: WorkerProcess, keys: dict[str, Path], who: str) -> None:
    if who == "mallory":
        curve = CurveClientKeys.load(str(keys["server_public"]), str(keys["mallory"]))
    elif who == "wrong_server_key":
        other_public = CurveClientKeys.load(str(keys["server_public"])).public  # not the worker's
        curve = CurveClientKeys.load(other_public.decode(), str(keys["alice"]))
    else:
        curve = None

    async def main() -> None:
        async with AsyncClient(curve_worker.endpoint, timeout=30, curve=curve) as client:
            t0 = time.monotonic()
            with pytest.raises(AuthenticationFailed, match="refused the connection handshake"):
                await client.ping()
            assert time.monotonic() - t0 < 2.0

    asyncio.run(main())
    if who == "mallory":
        deadline = time.monotonic() + 5
        while "refused a CurveZMQ client" not in curve_worker.log():
            assert time.monotonic() < deadline, curve_worker.log()
            time.sleep(0.05)


def test_non_loopback_needs_curve_or_insecure() -> None:
    args = [sys.executable, "-m", "ffai_worker.cli", "serve", "--model", str(TINYSTORIES)]
    done = subprocess.run(
        [*args, "--endpoint", "tcp://0.0.0.0:0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--curve-secret" in done.stderr and "--insecure" in done.stderr


def test_insecure_says_so_at_start_up() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    worker = WorkerProcess(TINYSTORIES, "--endpoint", f"tcp://0.0.0.0:{port}", "--insecure")
    try:
        assert "INSECURE: no authentication, no encryption" in worker.log()
    finally:
        worker.stop()
