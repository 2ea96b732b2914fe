"""Issued tokens' SQL: what the control plane remembers of a token (never the token itself), its
revocation, and the live count a project's quota is judged by. ``Revocations`` is the
Authenticator's view of it (``controlplane.tokens.RevocationStore``).

A token's ``revoked_at`` is the time from which it is refused: usually the moment it was revoked,
later for the consumer tokens of an ended session's jobs, which keep the right to report and leave
for the control plane's drain window. Revoking again never moves that time later."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.errors import Conflict, NotFound
from controlplane.store.base import QUOTA_LOCK
from controlplane.store.engine import Conn, Row, Store, time_or_none
from controlplane.store.projects import Project, get_project


@dataclass(frozen=True)
class TokenRecord:
    """What the control plane remembers of an issued token: never the token itself."""

    jti: str
    project: str | None
    kind: str
    subject: str
    scope: str
    issued_at: float
    expires_at: float
    revoked_at: float | None = None
    parent_jti: str | None = None


def _token(row: Row) -> TokenRecord:
    return TokenRecord(jti=row["jti"], project=row["project"], kind=row["kind"],
                       subject=row["subject"], scope=row["scope"],
                       issued_at=float(row["issued_at"]), expires_at=float(row["expires_at"]),
                       revoked_at=time_or_none(row["revoked_at"]), parent_jti=row["parent_jti"])


# Tokens of a project, of any kind, that are unexpired, not (yet) revoked and not older than its
# not_before: what its ``tokens`` quota counts.
_LIVE_TOKENS = ("SELECT COUNT(*) FROM tokens t JOIN projects p ON p.name = t.project "
                "WHERE t.project = ?1 AND (t.revoked_at IS NULL OR t.revoked_at > ?2) "
                "AND t.expires_at > ?2 "
                "AND (p.not_before IS NULL OR t.issued_at >= p.not_before)")
# Revoke from ``?1`` on, unless the token is refused earlier already (a NULL compares false).
REVOKE_FROM = "revoked_at = CASE WHEN revoked_at < ?1 THEN revoked_at ELSE ?1 END"


async def add_token(store: Store, rec: TokenRecord, *, limit: int | None = None) -> None:
    """Remember an issued token; Conflict on a reused jti, or when its project already holds
    ``limit`` live tokens (checked in the same transaction, so concurrent issues cannot both
    pass); NotFound for an unknown parent."""
    async def body(conn: Conn) -> None:
        if limit is not None and rec.project is not None:
            await conn.lock(QUOTA_LOCK)  # replicas on one database: see each other's issues
            async with conn.execute(_LIVE_TOKENS, (rec.project, rec.issued_at)) as cursor:
                row = await cursor.fetchone()
            if row is not None and row[0] >= limit:
                raise Conflict(f"project {rec.project!r} has reached its quota of {limit} live "
                               "tokens (exchanged ones included)")
        if rec.parent_jti is not None:
            async with conn.execute("SELECT 1 FROM tokens WHERE jti = ?",
                                    (rec.parent_jti,)) as found:
                if await found.fetchone() is None:
                    raise NotFound(f"parent token {rec.parent_jti!r} does not exist")
        await insert_token(conn, rec)
    await store.write(body)


async def insert_token(conn: Conn, rec: TokenRecord) -> None:
    """Remember ``rec`` inside the caller's transaction; Conflict on a reused jti."""
    cursor = await conn.execute(
        "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(jti) DO NOTHING",
        (rec.jti, rec.project, rec.kind, rec.subject, rec.scope, rec.issued_at,
         rec.expires_at, rec.revoked_at, rec.parent_jti))
    if cursor.rowcount == 0:
        raise Conflict(f"token id {rec.jti!r} already exists")


async def get_token(store: Store, jti: str) -> TokenRecord | None:
    rows = await store.read("SELECT * FROM tokens WHERE jti = ?", (jti,))
    return _token(rows[0]) if rows else None


async def list_tokens(store: Store, project: str) -> list[TokenRecord]:
    rows = await store.read(
        "SELECT * FROM tokens WHERE project = ? ORDER BY issued_at, jti", (project,))
    return [_token(row) for row in rows]


async def list_admin_tokens(store: Store, admin: str) -> list[TokenRecord]:
    rows = await store.read("SELECT * FROM tokens WHERE kind = 'admin' AND subject = ? "
                            "ORDER BY issued_at, jti", (admin,))
    return [_token(row) for row in rows]


async def revoke_token(store: Store, jti: str, at: float) -> TokenRecord:
    """Revoke ``jti`` from ``at`` on; idempotent (an earlier revocation time stays); NotFound if
    unknown."""
    async def body(conn: Conn) -> TokenRecord:
        cursor = await conn.execute(
            f"UPDATE tokens SET {REVOKE_FROM} WHERE jti = ?2 RETURNING *", (at, jti))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"token {jti!r} does not exist")
        return _token(row)
    return await store.write(body)


async def is_revoked(store: Store, jti: str, now: float) -> bool:
    """Whether ``jti`` is refused at ``now``."""
    rows = await store.read(
        "SELECT 1 FROM tokens WHERE jti = ? AND revoked_at <= ?", (jti, now))
    return bool(rows)


@dataclass(frozen=True)
class Revocations:
    """The store as the Authenticator reads it (``controlplane.tokens.RevocationStore``):
    revocations, the parents of exchanged tokens, projects, admins."""

    store: Store

    async def is_revoked(self, jti: str, now: float) -> bool:
        return await is_revoked(self.store, jti, now)

    async def get_token(self, jti: str) -> TokenRecord | None:
        return await get_token(self.store, jti)

    async def get_project(self, name: str) -> Project | None:
        return await get_project(self.store, name)

    async def is_active_admin(self, name: str) -> bool:
        return bool(await self.store.read(
            "SELECT 1 FROM admins WHERE name = ? AND removed_at IS NULL", (name,)))
