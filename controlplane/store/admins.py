"""Admins' SQL: the named admin principals and their tokens' life, each change in one
``Store.write`` transaction with the token rows it implies.

An admin is active until removed (``removed_at``); removing one revokes every token of it in the
same transaction, and a token is only ever added for an active admin, checked in the transaction
that adds it, so a removal racing an issue cannot leave a live token behind. The last active admin
cannot be removed: only an offline recovery on the state directory could then act again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from controlplane.errors import Conflict, NotFound
from controlplane.store.engine import Conn, Row, Store, time_or_none
from controlplane.store.tokens import TokenRecord, insert_token

ADMIN_KIND = "admin"  # the tokens.kind of admin tokens


@dataclass(frozen=True)
class Admin:
    """An admin and, at the time it was read, its live tokens: how many, and when the last of them
    expires (when the admin is locked out unless it gets a new one)."""

    name: str
    created_at: float
    created_by: str
    removed_at: float | None = None
    live_tokens: int = 0
    last_expiry: float | None = None

    @property
    def active(self) -> bool:
        return self.removed_at is None


def _admin(row: Row) -> Admin:
    return Admin(name=row["name"], created_at=float(row["created_at"]),
                 created_by=row["created_by"], removed_at=time_or_none(row["removed_at"]),
                 live_tokens=int(row["live_tokens"]), last_expiry=time_or_none(row["last_expiry"]))


_WITH_LIVE_TOKENS = (
    "SELECT a.name, a.created_at, a.created_by, a.removed_at, COUNT(t.jti) AS live_tokens, "
    "MAX(t.expires_at) AS last_expiry FROM admins a LEFT JOIN tokens t "
    f"ON t.kind = '{ADMIN_KIND}' AND t.subject = a.name AND t.revoked_at IS NULL "
    "AND t.expires_at > ?")
_ONE_WITH_LIVE_TOKENS = _WITH_LIVE_TOKENS + " WHERE a.name = ? GROUP BY a.name"


async def list_admins(store: Store, now: float) -> list[Admin]:
    rows = await store.read(_WITH_LIVE_TOKENS + " GROUP BY a.name ORDER BY a.name", (now,))
    return [_admin(row) for row in rows]


async def get_admin(store: Store, name: str, now: float) -> Admin | None:
    rows = await store.read(_ONE_WITH_LIVE_TOKENS, (now, name))
    return _admin(rows[0]) if rows else None


async def _state(conn: Conn, name: str) -> Literal["absent", "active", "removed"]:
    async with conn.execute("SELECT removed_at FROM admins WHERE name = ?", (name,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return "absent"
    return "active" if row["removed_at"] is None else "removed"


async def _revoke_tokens_of(conn: Conn, name: str, at: float) -> None:
    await conn.execute("UPDATE tokens SET revoked_at = ? WHERE kind = ? AND subject = ? "
                       "AND revoked_at IS NULL", (at, ADMIN_KIND, name))


async def _insert(conn: Conn, token: TokenRecord) -> None:
    """Insert an admin token, naming its parent only if that token is on record (the foreign key
    would refuse one that is not; every token this service issues is)."""
    parent = token.parent_jti
    if parent is not None:
        async with conn.execute("SELECT 1 FROM tokens WHERE jti = ?", (parent,)) as cursor:
            parent = parent if await cursor.fetchone() else None
    await insert_token(conn, dataclasses.replace(token, parent_jti=parent))


async def enable_admin(store: Store, token: TokenRecord, *, by: str, at: float,
                       exists_ok: bool, revoke_others: bool = False) -> None:
    """Make ``token.subject`` an active admin (new, or removed before) and remember ``token`` in
    the same transaction, revoking every other token of it first if ``revoke_others``. Conflict
    if it is active already, unless ``exists_ok`` (recovery)."""
    async def body(conn: Conn) -> None:
        if await _state(conn, token.subject) == "active" and not exists_ok:
            raise Conflict(f"admin {token.subject!r} already exists")
        await conn.execute(
            "INSERT INTO admins VALUES (?, ?, ?, NULL) "
            "ON CONFLICT(name) DO UPDATE SET removed_at = NULL", (token.subject, at, by))
        if revoke_others:
            await _revoke_tokens_of(conn, token.subject, at)
        await _insert(conn, token)
    await store.write(body)


async def add_admin_token(store: Store, token: TokenRecord, *,
                          revoke_others_at: float | None = None) -> None:
    """Remember a new token of an active admin; NotFound for an unknown admin, Conflict for a
    removed one. With ``revoke_others_at``, every other token of the admin is revoked in the same
    transaction (a rotation)."""
    async def body(conn: Conn) -> None:
        state = await _state(conn, token.subject)
        if state == "absent":
            raise NotFound(f"admin {token.subject!r} does not exist")
        if state == "removed":
            raise Conflict(f"admin {token.subject!r} has been removed; adding it again "
                           "enables it with a new token")
        if revoke_others_at is not None:
            await _revoke_tokens_of(conn, token.subject, revoke_others_at)
        await _insert(conn, token)
    await store.write(body)


async def remove_admin(store: Store, name: str, at: float) -> Admin:
    """Remove admin ``name`` and revoke every token of it, at once, and return it; removing a
    removed admin again changes nothing. NotFound for an unknown admin; Conflict for the last
    active one."""
    async def body(conn: Conn) -> Admin:
        state = await _state(conn, name)
        if state == "absent":
            raise NotFound(f"admin {name!r} does not exist")
        if state == "active":
            await _refuse_last(conn, name)
            await conn.execute("UPDATE admins SET removed_at = ? WHERE name = ?", (at, name))
            await _revoke_tokens_of(conn, name, at)
        async with conn.execute(_ONE_WITH_LIVE_TOKENS, (at, name)) as cursor:
            row = await cursor.fetchone()
        assert row is not None  # read in the transaction that found it
        return _admin(row)
    return await store.write(body)


async def _refuse_last(conn: Conn, name: str) -> None:
    async with conn.execute("SELECT COUNT(*) FROM admins WHERE removed_at IS NULL "
                            "AND name != ?", (name,)) as cursor:
        row = await cursor.fetchone()
    if row is None or row[0] == 0:
        raise Conflict(f"admin {name!r} is the last active admin; add another admin before "
                       "removing this one")
