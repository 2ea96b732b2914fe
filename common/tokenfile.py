"""The one reader of token files: project, admin and consumer tokens are handed over as files.

A token never travels on a command line (``ps`` and shell history would show it). Its file must be
a regular file of this user's that no one else can read, small, and hold exactly one token.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.privatefs import PrivatePathError, read_private_file

MAX_TOKEN_BYTES = 16 * 1024


class TokenFileError(PrivatePathError):
    """A token file that is missing, not private, too large, or does not hold one token."""


def read_token(path: Path) -> str:
    """The token in ``path``."""
    try:
        raw = read_private_file(path, max_bytes=MAX_TOKEN_BYTES, what="token file")
    except PrivatePathError as exc:
        raise TokenFileError(str(exc)) from None
    token = raw.decode("ascii", errors="replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenFileError(f"token file {path} does not hold one token")
    return token


def token_from(path: Path | None, *, env: str, default: Path | None = None) -> str:
    """The token in ``path``; without one, the environment variable ``env``, else the ``default``
    file. TokenFileError names all three places when none holds a token."""
    if path is None and os.environ.get(env, "").strip():
        return os.environ[env].strip()
    chosen = path or default
    if chosen is None:
        raise TokenFileError(f"no token: give a token file or set {env}")
    if path is None and not chosen.exists():
        raise TokenFileError(f"no token: {chosen} does not exist (give a token file or set {env})")
    return read_token(chosen)
