"""The one reader of token files: project, admin and consumer tokens are handed over as files
(the admin commands also take one from an environment variable, ``token_from``).

A token never travels on a command line (``ps`` and shell history would show it). Its file must be
a regular file of this user's that no one else can read, small, and hold exactly one token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    return _one_token(raw.decode("ascii", errors="replace"), f"token file {path}")


def _one_token(text: str, where: str) -> str:
    token = text.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenFileError(f"{where} holds more than the {MAX_TOKEN_BYTES} bytes of a token")
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenFileError(f"{where} does not hold one token")
    return token


@dataclass(frozen=True)
class FoundToken:
    """A token and where it was found (for the user: never the token itself)."""

    token: str = field(repr=False)
    source: str


def token_from(path: Path | None, *, env: str, default: Path | None = None,
               option: str = "--token-file") -> FoundToken:
    """The token in the file ``path`` (given with ``option``) or in the environment variable
    ``env``, whichever is given; neither: the ``default`` file. Both is an error rather than a
    silent choice, so a stale variable can never override the file meant (or the reverse).
    TokenFileError names the places looked at when none holds a token."""
    from_env = os.environ.get(env, "")
    if path is not None and from_env.strip():
        raise TokenFileError(f"two tokens given: {option} {path} and ${env}; "
                             f"give one (unset {env}, or drop {option})")
    if from_env.strip():
        return FoundToken(_one_token(from_env, f"${env}"), f"${env}")
    if path is not None:
        return FoundToken(read_token(path), f"{option} {path}")
    if default is None:
        raise TokenFileError(f"no token: give {option} or set {env}")
    if not default.exists():
        raise TokenFileError(f"no token: {default} does not exist (give {option} or set {env})")
    return FoundToken(read_token(default), f"{default} (the default)")
