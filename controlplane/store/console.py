"""The web console's sign-ins: one row per browser session, keyed by the hash of the secret its
cookie carries, holding the claims of the token it was opened with. A row outlives neither its
token nor its ``expires_at``; signing out sets ``ended_at``; rows past their expiry are deleted
when a new session opens, so the table stays as small as the live sessions."""

from __future__ import annotations

import json

from controlplane.store.engine import Conn, Store


async def insert_session(store: Store, session_id: str, claims: dict[str, object], jti: str,
                         now: float, expires_at: float) -> None:
    async def body(conn: Conn) -> None:
        await conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
        await conn.execute(
            "INSERT INTO console_sessions (id, claims, jti, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (session_id, json.dumps(claims, sort_keys=True), jti, now, expires_at))
    await store.write(body)


async def live_session(store: Store, session_id: str,
                       now: float) -> tuple[dict[str, object], float] | None:
    """The claims and expiry of a session neither ended nor expired at ``now``; None otherwise."""
    rows = await store.read(
        "SELECT claims, expires_at FROM console_sessions "
        "WHERE id = ? AND ended_at IS NULL AND expires_at > ?", (session_id, now))
    if not rows:
        return None
    claims: dict[str, object] = json.loads(rows[0]["claims"])
    return claims, float(rows[0]["expires_at"])


async def end_session(store: Store, session_id: str, now: float) -> None:
    async def body(conn: Conn) -> None:
        await conn.execute(
            "UPDATE console_sessions SET ended_at = ? WHERE id = ? AND ended_at IS NULL",
            (now, session_id))
    await store.write(body)
