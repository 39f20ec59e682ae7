"""The ipc socket: a directory and file no other local user can take or replace (SPEC 1)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINYSTORIES, WorkerProcess

from ffai_client import AsyncClient, UnsafeEndpoint
from ffai_client.endpoints import runtime_dir

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's files")


def _serve(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `ffai-worker serve` expecting it to refuse (it must exit by itself)."""
    args = [sys.executable, "-m", "ffai_worker.cli", "serve", "--model", str(TINYSTORIES), *extra]
    return subprocess.run(
        args, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def _runtime(tmp_path: Path) -> tuple[dict[str, str], Path]:
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "FFAI_ENDPOINT": ""}
    return env, tmp_path / "ffai"


def test_worker_creates_private_dir_and_socket_despite_umask(tmp_path: Path) -> None:
    """A umask of 0 still gives a 0700 directory and a 0600 socket file."""
    env, directory = _runtime(tmp_path)
    old = os.umask(0)
    try:
        args = ["--endpoint", f"ipc://{directory}/worker.sock"]
        worker = WorkerProcess.__new__(WorkerProcess)
        worker.dir = str(tmp_path)
        worker.endpoint = args[1]
        worker.log_path = tmp_path / "worker.log"
        worker._log = open(worker.log_path, "wb")
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "ffai_worker.cli", "serve", "--model", str(TINYSTORIES), *args],
            stdout=worker._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    finally:
        os.umask(old)
    try:
        worker.wait_ready()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / "worker.sock").stat().st_mode) == 0o600
    finally:
        worker.stop()


def test_worker_refuses_loose_runtime_dir(tmp_path: Path) -> None:
    env, directory = _runtime(tmp_path)
    directory.mkdir()
    directory.chmod(0o777)
    done = _serve(env)
    assert done.returncode != 0
    assert f"refusing the socket directory {directory}" in done.stderr, done.stderr
    assert "0777" in done.stderr and "chmod 700" in done.stderr
    assert not (directory / "worker.sock").exists()


@as_root
def test_worker_refuses_dir_precreated_by_another_user(tmp_path: Path) -> None:
    """The /tmp/ffai-$UID attack: another user made the directory first."""
    tmp_path.chmod(0o755)
    env, directory = _runtime(tmp_path)
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    directory.chmod(0o777)
    done = _serve(env)
    assert done.returncode != 0
    assert f"belongs to uid {NOBODY}" in done.stderr, done.stderr
    assert not (directory / "worker.sock").exists()


@as_root
def test_client_refuses_socket_in_another_users_dir(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    directory = tmp_path / "theirs"
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    endpoint = f"ipc://{directory}/worker.sock"

    async def main() -> None:
        async with AsyncClient(endpoint) as client:
            with pytest.raises(UnsafeEndpoint, match=f"belongs to uid {NOBODY}"):
                await client.ping()

    asyncio.run(main())


def test_client_refuses_loose_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("FFAI_ENDPOINT", raising=False)
    directory = runtime_dir()
    directory.mkdir()
    directory.chmod(0o770)

    async def main() -> None:
        async with AsyncClient() as client:
            with pytest.raises(UnsafeEndpoint, match="must be 0700"):
                await client.ping()

    asyncio.run(main())


def test_second_worker_refused_and_first_keeps_serving(tinystories_worker: WorkerProcess) -> None:
    done = _serve({}, "--endpoint", tinystories_worker.endpoint)
    assert done.returncode != 0
    assert "another worker is already serving" in done.stderr, done.stderr

    async def main() -> None:
        async with AsyncClient(tinystories_worker.endpoint) as client:
            assert (await client.ping()).running == 0

    asyncio.run(main())
