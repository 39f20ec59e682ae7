"""CurveZMQ keys for clients: where they come from and how a socket uses them.

Keys are pyzmq's `zmq.auth` certificate files (`NAME.key` holds the public
key, `NAME.key_secret` both), or a bare 40-character Z85 public key for the
server. A client with the worker's public key but no key pair of its own uses
a fresh one per socket: encrypted, but accepted only by a worker without an
allow-list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

SERVER_KEY_ENV = "FFAI_CURVE_SERVER_KEY"
CLIENT_KEY_ENV = "FFAI_CURVE_KEY"
Z85_KEY_LENGTH = 40


class CurveKeyError(ValueError):
    """A key file or key string could not be read."""


def load_public_key(value: str) -> bytes:
    """A Z85 public key given as itself or as a certificate file's path."""
    if len(value) == Z85_KEY_LENGTH and not Path(value).exists():
        return value.encode("ascii")
    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read a CurveZMQ public key from {value}: {exc}") from None
    return public


def load_key_pair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a `*.key_secret` certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read a CurveZMQ key pair from {path}: {exc}") from None
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (give the *.key_secret file)")
    return public, secret


@dataclass(frozen=True)
class CurveClientKeys:
    """What a client socket needs to speak CurveZMQ to one worker."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str, client_key: str | None = None) -> CurveClientKeys:
        server = load_public_key(server_key)
        if client_key:
            public, secret = load_key_pair(client_key)
        else:
            public, secret = zmq.curve_keypair()
        return cls(server, public, secret)

    @classmethod
    def from_env(cls) -> CurveClientKeys | None:
        """Keys named by FFAI_CURVE_SERVER_KEY / FFAI_CURVE_KEY, or None when unset."""
        server = os.environ.get(SERVER_KEY_ENV)
        if not server:
            return None
        return cls.load(server, os.environ.get(CLIENT_KEY_ENV) or None)

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


__all__ = [
    "CLIENT_KEY_ENV",
    "SERVER_KEY_ENV",
    "CurveClientKeys",
    "CurveKeyError",
    "load_key_pair",
    "load_public_key",
]
