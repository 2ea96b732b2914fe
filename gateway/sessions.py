"""Sessions the gateway serves, as an immutable lookup table that can be swapped atomically.

A SessionSource produces SessionTables. The static FileSessionSource reads the DSN configuration
file; a live source (control-plane updates) produces a new table per update. Readers hold a
reference to one table for the duration of a decision, so replacing the table (a single attribute
assignment) never shows them a half-updated state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.config import ConfigError, DSNConfig, Network, Session, load_config


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """A session with everything a per-message or per-connection check needs, parsed once."""

    session: Session
    networks: tuple[Network, ...]
    # Epoch seconds; +inf for a session without an expiry, so the hot path compares two floats.
    expires: float

    @property
    def id(self) -> str:
        return self.session.id

    def admits(self, address: str) -> bool:
        """True if a peer at ``address`` lies inside one of the session's source networks."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def expired(self, now: float) -> bool:
        return now >= self.expires


def _entry(session: Session) -> SessionEntry:
    networks = tuple(ipaddress.ip_network(net) for net in session.allowed_networks)
    expires = session.expires_at.timestamp() if session.expires_at else float("inf")
    return SessionEntry(session, networks, expires)


class SessionTable:
    """Sessions by id and by client CURVE public key (Z85). Immutable once built."""

    __slots__ = ("_by_id", "_by_key")

    def __init__(self, sessions: Iterable[Session] = ()) -> None:
        by_id: dict[str, SessionEntry] = {}
        by_key: dict[str, SessionEntry] = {}
        for session in sessions:
            if session.id in by_id:
                raise ConfigError(f"sessions: id {session.id!r} appears twice")
            entry = by_id[session.id] = _entry(session)
            for key in session.client_keys:
                if key in by_key:
                    raise ConfigError(f"sessions.{session.id}.client_keys: a key already "
                                      f"belongs to session {by_key[key].id!r}")
                by_key[key] = entry
        self._by_id = by_id
        self._by_key = by_key

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[SessionEntry]:
        return iter(self._by_id.values())

    def by_id(self, session_id: str) -> SessionEntry | None:
        return self._by_id.get(session_id)

    def by_key(self, client_key_z85: str) -> SessionEntry | None:
        return self._by_key.get(client_key_z85)

    @property
    def max_sector_bytes(self) -> int:
        return max((e.session.detector.sector_bytes for e in self), default=0)


class SessionSource(Protocol):
    """Anything that can produce the current table of sessions."""

    def load(self) -> SessionTable: ...


class FileSessionSource:
    """Sessions from a static DSN configuration file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SessionTable:
        return table_from_config(load_config(self.path))


def table_from_config(config: DSNConfig) -> SessionTable:
    return SessionTable(config.sessions)
