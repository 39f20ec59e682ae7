"""A real `ffai-gateway` subprocess on a free loopback port, for the gateway tests."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import free_port


class GatewayProcess:
    """`ffai-gateway --listen 127.0.0.1:PORT --worker ...`, ready once it answers."""

    def __init__(self, *workers: str, extra: tuple[str, ...] = (), wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="ffai-gw-")) / "gateway.log"
        args = [
            sys.executable,
            "-m",
            "ffai_client.gateway.cli",
            "--listen",
            f"127.0.0.1:{self.port}",
        ]
        for worker in workers:
            args += ["--worker", worker]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*args, *extra], stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answers (with an API key set, 401)
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"gateway did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
