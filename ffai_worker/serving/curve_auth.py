"""CurveZMQ on the worker: key pairs, the client allow-list, pyzmq's authenticator.

No cryptography of our own: libzmq does CurveZMQ, `zmq.auth` writes and reads
the certificate files, and pyzmq's `ThreadAuthenticator` answers the ZAP
requests. Ours is only the allow-list callback, which re-reads the clients'
directory on each handshake (adding a key needs no restart) and logs every
refusal.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ffai_client.curve import load_key_pair

log = logging.getLogger("ffai_worker")


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Create `NAME.key` (public, share it) and `NAME.key_secret` (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, even briefly
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


class ClientAllowList:
    """ZAP credentials provider: a client key is allowed when its `*.key` file is in `directory`."""

    def __init__(self, directory: Path, also: frozenset[bytes] = frozenset()) -> None:
        self.directory = directory
        self.also = also  # keys allowed whatever the folder holds (the worker's own)

    def allowed_keys(self) -> set[bytes]:
        try:
            return set(zmq.auth.load_certificates(str(self.directory))) | self.also
        except (OSError, ValueError) as exc:
            log.error("cannot read the CurveZMQ client keys in %s: %s", self.directory, exc)
            return set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed_keys():
            return True
        log.warning(
            "refused a CurveZMQ client: its key %s is not in %s",
            key.decode("ascii", "replace"),
            self.directory,
        )
        return False


class CurveServer:
    """The worker's key pair and, while it serves, the authenticator thread."""

    def __init__(self, secret_file: str, clients_dir: str | None) -> None:
        self.secret_file = secret_file
        self.public, self.secret = load_key_pair(secret_file)
        self.clients_dir = Path(clients_dir) if clients_dir else None
        self._auth: ThreadAuthenticator | None = None

    def describe(self) -> str:
        if self.clients_dir is None:
            return "CurveZMQ (encrypted; any client key accepted)"
        count = len(ClientAllowList(self.clients_dir).allowed_keys())
        return f"CurveZMQ ({count} allowed client keys in {self.clients_dir})"

    def apply(self, ctx: zmq.Context[zmq.Socket[bytes]], sock: zmq.Socket[bytes]) -> None:
        """Start the authenticator and make `sock` a Curve server (before it binds)."""
        auth = ThreadAuthenticator(ctx, log=log)
        auth.start()
        if self.clients_dir is None:
            auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            auth.configure_curve_callback(
                "*", credentials_provider=ClientAllowList(self.clients_dir)
            )
        self._auth = auth
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
