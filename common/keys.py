"""CURVE key pairs on disk, in ZeroMQ's certificate format (``NAME.key`` and ``NAME.key_secret``).

The secret file is written 0600 and never leaves the machine that made it; the public file is what
an admin puts in a DSN configuration (client keys) or hands to producers (the gateway's server key).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import zmq.auth

from common.errors import DsnError
from common.privatefs import private_dir


class KeyFileError(DsnError, ValueError):
    """A key file that is missing, unreadable or not a CURVE certificate."""


class KeyPair(NamedTuple):
    public: bytes  # Z85, 40 bytes
    secret: bytes | None


def create_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Create ``name.key`` and ``name.key_secret`` in ``directory``; returns both paths."""
    private_dir(directory)
    old_umask = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keypair(path: Path) -> KeyPair:
    """Load a certificate file; ``secret`` is None for a public-only ``.key`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load CURVE key file {path}: {exc}") from None
    if public is None or len(public) != 40:
        raise KeyFileError(f"{path} holds no Z85 CURVE public key")
    return KeyPair(public, secret)


def load_secret_keypair(path: Path) -> KeyPair:
    """Load a ``.key_secret`` file, refusing one that other users can read."""
    pair = load_keypair(path)
    if pair.secret is None:
        raise KeyFileError(f"{path} holds no secret key (expected a .key_secret file)")
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"{path} is readable by other users; run: chmod 600 {path}")
    return pair
