"""ZAP 1.0 (RFC 27): the requests libzmq sends a context's authentication handler, and its replies.

A handler is a REP socket bound at ``ENDPOINT`` on the context whose sockets it authenticates;
libzmq asks it about every connection to a socket with a ``zap_domain`` and waits for the answer.

Request frames (libzmq -> handler):
    version      "1.0"
    request id   opaque; the reply echoes it
    domain       the socket's ``zap_domain``
    address      the peer's IP address, as text
    identity     the peer's routing identity (often empty)
    mechanism    "NULL", "PLAIN" or "CURVE"
    credentials  zero or more frames, by mechanism: CURVE one frame, the client's 32-byte public
                 key; PLAIN two, username and password (each at most 255 bytes); NULL none

Reply frames (handler -> libzmq):
    version      "1.0"
    request id   the request's
    status code  "200" (allowed) or "400" (denied)
    status text  "OK", or why the connection was denied
    user id      who the peer is, when allowed; libzmq attaches it to every message of the
                 connection as its ``User-Id`` property (empty when denied)
    metadata     empty
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from zmq.utils import z85

from common.errors import DsnError

ENDPOINT: Final = "inproc://zeromq.zap.01"
VERSION: Final = b"1.0"
CURVE_KEY_BYTES: Final = 32
# ZMTP PLAIN carries each credential with a one-byte length.
MAX_PLAIN_BYTES: Final = 255
ALLOWED: Final = b"200"
DENIED: Final = b"400"
_HEADER_FRAMES: Final = 6


class ZapError(DsnError, ValueError):
    """A frame list that is not a ZAP 1.0 request.

    It still carries what a handler needs to answer and log it: ``request_id`` and ``address``
    (empty when the request is too short to hold them).
    """

    def __init__(self, frames: Sequence[bytes], problem: str) -> None:
        super().__init__(f"not a ZAP 1.0 request: {problem}")
        self.request_id = frames[1] if len(frames) > 1 else b""
        self.address = _text(frames[3]) if len(frames) > 3 else ""


@dataclass(frozen=True, slots=True)
class ZapRequest:
    """One well-formed request; the credentials are as libzmq sent them, checked on reading."""

    version: bytes
    request_id: bytes
    domain: bytes
    address: str
    identity: bytes
    mechanism: bytes
    credentials: tuple[bytes, ...]

    def curve_key(self) -> str | None:
        """The client's Z85 public key, if this is a CURVE request with exactly one 32-byte key."""
        if self.mechanism != b"CURVE" or len(self.credentials) != 1:
            return None
        key = self.credentials[0]
        return z85.encode(key).decode("ascii") if len(key) == CURVE_KEY_BYTES else None

    def plain_credentials(self) -> tuple[bytes, bytes] | None:
        """(username, password), if this is a PLAIN request with exactly those two, each short
        enough for ZMTP to have carried it."""
        if self.mechanism != b"PLAIN" or len(self.credentials) != 2:
            return None
        username, password = self.credentials
        if len(username) > MAX_PLAIN_BYTES or len(password) > MAX_PLAIN_BYTES:
            return None
        return username, password


def _text(frame: bytes) -> str:
    return frame.decode("ascii", "replace")


def parse(frames: Sequence[bytes]) -> ZapRequest:
    """The request in ``frames``; ZapError if it lacks a frame of the header or is not 1.0."""
    if len(frames) < _HEADER_FRAMES:
        raise ZapError(frames, f"{len(frames)} frames, at least {_HEADER_FRAMES} expected")
    if frames[0] != VERSION:
        raise ZapError(frames, f"version {frames[0][:16]!r}")
    return ZapRequest(version=frames[0], request_id=frames[1], domain=frames[2],
                      address=_text(frames[3]), identity=frames[4], mechanism=frames[5],
                      credentials=tuple(frames[_HEADER_FRAMES:]))


def allow(request_id: bytes, user_id: str) -> list[bytes]:
    """The reply admitting the peer as ``user_id``."""
    return [VERSION, request_id, ALLOWED, b"OK", user_id.encode(), b""]


def deny(request_id: bytes, reason: str) -> list[bytes]:
    """The reply refusing the peer; ``reason`` is the status text."""
    return [VERSION, request_id, DENIED, reason.encode(), b"", b""]
