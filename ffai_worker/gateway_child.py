"""`ffai-worker serve --http HOST:PORT`: the HTTP gateway as a child process of the worker.

The gateway stays its own process (a client of this worker over its
endpoint), so the actor loop is untouched; it starts once the worker's socket
is bound and is stopped when the worker stops. An API key for a non-loopback
address comes from `$FFAI_GATEWAY_API_KEY`, which the child inherits.
"""

from __future__ import annotations

import subprocess
import sys

STOP_TIMEOUT_S = 5.0


def start_gateway(listen: str, endpoint: str, allow_remote: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ffai_client.gateway.cli", "--listen", listen,
            "--worker", endpoint]  # fmt: skip
    if allow_remote:
        args.append("--allow-remote")
    return subprocess.Popen(args)


def stop_gateway(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited in time."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
