"""`ffai-worker serve --http HOST:PORT`: the HTTP gateway as a child process of the worker.

The gateway stays its own process (a client of this worker over its
endpoint), so the actor loop is untouched; it starts once the worker's socket
is bound and is stopped when the worker stops. An API key for a non-loopback
address comes from `$FFAI_GATEWAY_API_KEY`, which the child inherits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ffai_worker.serving.curve_auth import CurveServer

STOP_TIMEOUT_S = 5.0


def start_gateway(
    listen: str, endpoint: str, *, allow_remote: bool, curve: CurveServer | None = None
) -> subprocess.Popen[bytes]:
    """Start the gateway; with CurveZMQ it connects with the worker's own key pair."""
    args = [sys.executable, "-m", "ffai_client.gateway.cli", "--listen", listen,
            "--worker", endpoint]  # fmt: skip
    if allow_remote:
        args.append("--allow-remote")
    env = dict(os.environ)
    if curve is not None:
        env["FFAI_CURVE_SERVER_KEY"] = curve.public.decode("ascii")
        env["FFAI_CURVE_KEY"] = curve.secret_file
    return subprocess.Popen(args, env=env)


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
