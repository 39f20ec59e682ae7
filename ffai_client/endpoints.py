"""Where the local worker listens: one place, shared by the client and the worker."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from ffai_client.errors import UnsafeEndpoint

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


def _owner_ok(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_socket_dir(directory: Path, *, private: bool) -> None:
    """Refuse a socket directory another local user could control.

    Safe: owned by this user (or root) with no group/other write bit, or a
    root-owned sticky directory such as /tmp (others cannot replace our file
    there). `private` (the default runtime directory) demands owner-only mode.
    """
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return  # nothing to trust or distrust yet: the worker creates it 0700
    mode = stat.S_IMODE(st.st_mode)
    problem = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a plain directory"
    elif not _owner_ok(st.st_uid):
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    elif private and mode & 0o077:
        problem = f"has mode {mode:04o}; it must be 0700"
    elif mode & 0o022 and not (st.st_uid == 0 and mode & stat.S_ISVTX):
        problem = f"has mode {mode:04o}: other users may replace the socket in it"
    if problem:
        raise UnsafeEndpoint(
            f"refusing the socket directory {directory}: it {problem}; "
            f"remove it (rm -r {directory}) or fix it (chmod 700 {directory}) and retry"
        )


def check_socket_file(path: Path) -> None:
    """Refuse a socket file that another user created (it would receive our prompts)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or not _owner_ok(st.st_uid):
        raise UnsafeEndpoint(
            f"refusing {path}: it is not a socket owned by you (uid {st.st_uid}); "
            "it may belong to another user"
        )


def check_ipc_endpoint(endpoint: str) -> None:
    """Client-side check before connecting: the socket's directory and file are ours."""
    path = ipc_path(endpoint)
    if path is None:
        return
    check_socket_dir(path.parent, private=path.parent == runtime_dir())
    check_socket_file(path)


__all__ = [
    "ENDPOINT_ENV",
    "check_ipc_endpoint",
    "check_socket_dir",
    "check_socket_file",
    "default_endpoint",
    "ipc_path",
    "resolve_endpoint",
    "runtime_dir",
]
