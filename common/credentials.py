"""A session's PLAIN credentials: how a producer without CURVE proves it holds the session token.

The producer SDK derives them from the session token it was given; the control plane publishes
the password's SHA-256 for the gateway's ZAP handler to check. One definition serves all three.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlainCredentials:
    """ZMTP PLAIN credentials for a session allowed unencrypted transport: the session id and the
    session token's signature (a whole token exceeds PLAIN's 255-byte limit)."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def of(cls, session_id: str, session_token: str) -> PlainCredentials:
        # The signature is as unguessable as the whole token, and bound to it.
        return cls(session_id, session_token.rsplit(".", 1)[-1])

    @property
    def password_sha256(self) -> str:
        """What the session publishes for the gateway to check the password against."""
        return hashlib.sha256(self.password.encode("ascii")).hexdigest()
