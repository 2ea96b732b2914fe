"""Signing keys' SQL: each key's public JWK and its life (created, stopped signing, retired); the
private halves never reach the store (``controlplane.signing`` keeps them on disk, each in the
state directory of the replica that signs with it)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from controlplane.errors import Conflict, NotFound
from controlplane.store.engine import Conn, Row, Store, time_or_none


@dataclass(frozen=True)
class SigningKeyRecord:
    kid: str
    created_at: float
    retired_at: float | None
    public_jwk: dict[str, str]
    stopped_at: float | None = None  # when its replica replaced it (None: it may still sign)


def _signing_key(row: Row) -> SigningKeyRecord:
    return SigningKeyRecord(kid=row["kid"], created_at=float(row["created_at"]),
                            retired_at=time_or_none(row["retired_at"]),
                            public_jwk=json.loads(row["public_jwk"]),
                            stopped_at=time_or_none(row["stopped_at"]))


async def add_signing_key(store: Store, rec: SigningKeyRecord, *, replaces: str | None = None
                          ) -> None:
    """Publish ``rec``; in the same transaction, ``replaces`` (the key it takes over from) stops
    signing at ``rec.created_at``. Conflict on a known kid."""
    async def body(conn: Conn) -> None:
        cursor = await conn.execute(
            "INSERT INTO signing_keys (kid, created_at, retired_at, public_jwk, stopped_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(kid) DO NOTHING",
            (rec.kid, rec.created_at, rec.retired_at, json.dumps(rec.public_jwk),
             rec.stopped_at))
        if cursor.rowcount == 0:
            raise Conflict(f"signing key {rec.kid!r} already exists")
        if replaces is not None:
            await conn.execute("UPDATE signing_keys SET stopped_at = COALESCE(stopped_at, ?) "
                               "WHERE kid = ?", (rec.created_at, replaces))
    await store.write(body)


async def list_signing_keys(store: Store) -> list[SigningKeyRecord]:
    """All keys, retired ones included, oldest first."""
    rows = await store.read("SELECT * FROM signing_keys ORDER BY created_at, rowid")
    return [_signing_key(row) for row in rows]


async def retire_signing_key(store: Store, kid: str, at: float) -> SigningKeyRecord:
    """Retire ``kid``; idempotent (keeps the first time); NotFound if unknown."""
    async def body(conn: Conn) -> SigningKeyRecord:
        cursor = await conn.execute(
            "UPDATE signing_keys SET retired_at = COALESCE(retired_at, ?) WHERE kid = ? "
            "RETURNING *", (at, kid))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"signing key {kid!r} does not exist")
        return _signing_key(row)
    return await store.write(body)
