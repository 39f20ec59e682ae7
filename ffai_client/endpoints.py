"""Where the local worker listens: one place, shared by the client and the worker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENDPOINT_ENV = "FFAI_ENDPOINT"
SOCKET_NAME = "worker.sock"


def runtime_dir() -> Path:
    """The per-user directory holding the worker's ipc socket.

    Linux: `$XDG_RUNTIME_DIR/ffai` (else `/tmp/ffai-$UID`); macOS: the user
    cache directory. The worker creates it with mode 0700.
    """
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ffai"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "ffai"
    return Path(f"/tmp/ffai-{os.getuid()}")


def default_endpoint() -> str:
    """The ipc endpoint of the local daemon when nothing else is configured."""
    return f"ipc://{runtime_dir() / SOCKET_NAME}"


def resolve_endpoint(endpoint: str | None = None) -> str:
    """An explicit endpoint, else `$FFAI_ENDPOINT`, else the default local daemon."""
    if endpoint:
        return endpoint
    return os.environ.get(ENDPOINT_ENV) or default_endpoint()


def ipc_path(endpoint: str) -> Path | None:
    """The socket file behind an `ipc://` endpoint, or None for other transports."""
    if endpoint.startswith("ipc://"):
        return Path(endpoint[len("ipc://") :])
    return None


__all__ = ["ENDPOINT_ENV", "default_endpoint", "ipc_path", "resolve_endpoint", "runtime_dir"]
