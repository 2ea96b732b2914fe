"""The sessions' SQL: records in and out of the store, each change in one ``Store.write``
transaction with the checks that must not race it (quotas, client keys, admission), under a lock
(``Conn.lock``) that also serialises those checks across the processes sharing the database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import astuple, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

from common.config import ConfigError, parse_config
from controlplane.errors import Conflict, NotFound
from controlplane.launchers import JobStatus
from controlplane.placement import loads_in
from controlplane.sessions.core import (
    ConsumerRecord,
    JobRecord,
    ScanRecord,
    SessionRecord,
    admission_problem,
    config_with_consumers,
    lease_until,
)
from controlplane.state import Placed
from controlplane.store.base import QUOTA_LOCK
from controlplane.store.engine import Conn, Row, Store
from controlplane.store.tokens import REVOKE_FROM, TokenRecord

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("dsn.controlplane.sessions")

R = TypeVar("R", bound="DataclassInstance")

_JSON_COLUMNS = frozenset({"params", "config", "lost_by_reason", "loss_manifest",
                           "lane_gateways"})
# JSON has no tuples: the lanes' gateways are a tuple of names, and a loss manifest a tuple of
# entry tuples, as a reported result makes it.
_TUPLES = frozenset({"lane_gateways"})
_TUPLES_OF_TUPLES = frozenset({"loss_manifest"})
# A scan result names its session ``session`` (common.results); its column is the ``session_id``
# of every other table.
_COLUMNS = {"session": "session_id"}


def _column(field_name: str) -> str:
    return _COLUMNS.get(field_name, field_name)


def _record(cls: type[R], row: Row) -> R:
    values = {f.name: row[_column(f.name)] for f in fields(cls)}
    for name in _JSON_COLUMNS & values.keys():
        values[name] = json.loads(values[name])
    for name in _TUPLES & values.keys():
        values[name] = tuple(values[name])
    for name in _TUPLES_OF_TUPLES & values.keys():
        values[name] = tuple(map(tuple, values[name]))
    return cls(**values)


def _json(value: Any) -> str:
    # One spelling for every write, so that a stored value compares equal to the one it was.
    return json.dumps(value, sort_keys=True)


async def _insert(conn: Conn, table: str, record: Any) -> None:
    # Table and column names come from the record dataclasses in ``core``, never from a request.
    values = {_column(f.name): getattr(record, f.name) for f in fields(record)}
    for name in _JSON_COLUMNS & values.keys():
        values[name] = _json(values[name])
    await conn.execute(f"INSERT INTO {table} ({', '.join(values)}) "
                       f"VALUES ({', '.join('?' * len(values))})", tuple(values.values()))


async def _one(conn: Conn, sql: str, params: Sequence[Any]) -> Row | None:
    async with conn.execute(sql, params) as cursor:
        row: Row | None = await cursor.fetchone()
    return row


async def _all(conn: Conn, sql: str, params: Sequence[Any]) -> list[Row]:
    async with conn.execute(sql, params) as cursor:
        return list(await cursor.fetchall())


# Picks the gateways of a new session's lanes inside its transaction (none: the configured
# gateway).
Chooser = Callable[[Conn], Awaitable[tuple[str, ...]]]


async def insert_session(store: Store, session: SessionRecord, token: TokenRecord, limit: int,
                         now: float, place: Chooser) -> SessionRecord:
    """Store the session, placed on the gateways ``place`` picks, and its token's metadata, in one
    transaction with the quota and client key checks and the gateways' loads, so that concurrent
    opens cannot both pass them."""
    async def body(conn: Conn) -> SessionRecord:
        await conn.lock(QUOTA_LOCK)  # replicas on one database: counts see each other's opens
        open_sessions = await _one(conn, "SELECT COUNT(*) FROM sessions WHERE project = ? AND "
                                         "ended_at IS NULL AND expires_at > ?",
                                   (session.project, now))
        if open_sessions is not None and open_sessions[0] >= limit:
            raise Conflict(f"project {session.project!r} has reached its quota of {limit} open "
                           "sessions; end one first")
        # The gateway admits a producer by its key alone: one key, one open session.
        if await _one(conn, "SELECT 1 FROM sessions WHERE client_key = ? AND ended_at IS NULL "
                            "AND expires_at > ?", (session.client_key, now)):
            raise Conflict("this client key already belongs to an open session")
        chosen = await place(conn)
        placed = replace(session, gateway=chosen[0] if chosen else None,
                         lane_gateways=chosen[1:])
        await conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", astuple(token))
        await _insert(conn, "sessions", placed)
        return placed
    return await store.write(body)


async def stranded_sessions(store: Store, now: float, live: Sequence[str]) -> list[SessionRecord]:
    """The open sessions with a lane placed on a gateway that is not among ``live``, oldest
    first."""
    rows = await store.read(
        "SELECT * FROM sessions WHERE gateway IS NOT NULL AND ended_at IS NULL AND expires_at > ? "
        "ORDER BY created_at, id", (now,))
    return [record for record in map(lambda row: _record(SessionRecord, row), rows)
            if not set(record.gateways) <= set(live)]


async def move_session(store: Store, session: SessionRecord, lane: int, target: str, now: float,
                       timeout_s: float) -> SessionRecord | None:
    """Move lane ``lane`` of the open ``session`` off its gateway to ``target``, if ``target`` can
    still take it (live, below capacity) and the session's lanes are still where they were; None
    (nothing changed) else."""
    async def body(conn: Conn) -> SessionRecord | None:
        load = next((load for load in await loads_in(conn, now) if load.gateway.name == target),
                    None)
        if load is None or not load.gateway.live(now, timeout_s) \
                or load.sessions >= load.gateway.capacity:
            return None
        gateways = list(session.gateways)
        previous, gateways[lane] = gateways[lane], target
        cursor = await conn.execute(
            "UPDATE sessions SET gateway = ?, lane_gateways = ?, previous_gateway = ?, "
            "replaced_at = ? WHERE id = ? AND gateway = ? AND lane_gateways = ? "
            "AND ended_at IS NULL RETURNING *",
            (gateways[0], _json(gateways[1:]), previous, now, session.id, session.gateway,
             _json(session.lane_gateways)))
        row = await cursor.fetchone()
        return _record(SessionRecord, row) if row is not None else None
    return await store.write(body)


async def get_session(store: Store, session_id: str) -> SessionRecord | None:
    rows = await store.read("SELECT * FROM sessions WHERE id = ?", (session_id,))
    return _record(SessionRecord, rows[0]) if rows else None


async def list_sessions(store: Store, project: str | None) -> list[SessionRecord]:
    # A parameter only compared with NULL is CAST: PostgreSQL must know its type.
    rows = await store.read("SELECT * FROM sessions WHERE CAST(?1 AS TEXT) IS NULL "
                            "OR project = ?1 ORDER BY created_at, id", (project,))
    return [_record(SessionRecord, row) for row in rows]


async def session_projects(store: Store, session_ids: Sequence[str]) -> dict[str, str]:
    """The project of each of ``session_ids`` the store knows (others are left out)."""
    found: dict[str, str] = {}
    unique = sorted(set(session_ids))
    for start in range(0, len(unique), 500):  # within SQLite's bound on bound parameters
        chunk = unique[start:start + 500]
        rows = await store.read("SELECT id, project FROM sessions WHERE id IN "
                                f"({', '.join('?' * len(chunk))})", tuple(chunk))
        found.update((str(row["id"]), str(row["project"])) for row in rows)
    return found


async def end_session(store: Store, session_id: str, now: float,
                      drain_s: float) -> SessionRecord:
    """Mark the session ended (idempotent: the first time stays), revoke its session token at
    once, so that no producer gets in any more, and its jobs' consumer tokens ``drain_s`` after
    the end, all in one transaction.

    The jobs' tokens wait because the end signals the jobs, whose ranks then finish, write and
    report the scans they hold and leave: those reports are the scans' only record. Meanwhile a
    consumer token can do nothing else a session's end should stop: registering and renewing a
    lease need an open session."""
    async def body(conn: Conn) -> SessionRecord:
        cursor = await conn.execute("UPDATE sessions SET ended_at = COALESCE(ended_at, ?) "
                                    "WHERE id = ? RETURNING *", (now, session_id))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} does not exist")
        ended_at = float(row["ended_at"])
        await conn.execute(f"UPDATE tokens SET {REVOKE_FROM} WHERE jti = ?2",
                           (ended_at, row["token_jti"]))
        await conn.execute(f"UPDATE tokens SET {REVOKE_FROM} WHERE jti IN "
                           "(SELECT token_jti FROM jobs WHERE session_id = ?2)",
                           (ended_at + drain_s, session_id))
        return _record(SessionRecord, row)
    return await store.write(body)


async def _open_session_in(conn: Conn, session_id: str, now: float) -> SessionRecord:
    row = await _one(conn, "SELECT * FROM sessions WHERE id = ?", (session_id,))
    if row is None:
        raise NotFound(f"session {session_id!r} does not exist")
    session = _record(SessionRecord, row)
    if session.state(now) != "open":
        raise Conflict(f"session {session_id} has {session.state(now)}")
    return session


async def _live_consumers_in(conn: Conn, session_id: str, now: float) -> list[ConsumerRecord]:
    rows = await _all(conn, "SELECT * FROM consumers WHERE session_id = ? AND left_at IS NULL "
                            "AND lease_expires_at > ? ORDER BY rank, job_id", (session_id, now))
    return [_record(ConsumerRecord, row) for row in rows]


async def register_consumer(store: Store, consumer: ConsumerRecord, limit: int,
                            now: float) -> None:
    async def body(conn: Conn) -> None:
        await conn.lock(QUOTA_LOCK)
        await _open_session_in(conn, consumer.session_id, now)
        live = await _live_consumers_in(conn, consumer.session_id, now)
        problem = admission_problem(live, consumer, limit)
        if problem is not None:
            raise Conflict(problem)
        await _insert(conn, "consumers", consumer)
    await store.write(body)


async def renew_lease(store: Store, session_id: str, consumer_id: str, lease_s: int,
                      now: float) -> ConsumerRecord:
    """Extend a live lease; a lease that expired or was left cannot be revived: register again."""
    async def body(conn: Conn) -> ConsumerRecord:
        session = await _open_session_in(conn, session_id, now)
        consumer = await _consumer_in(conn, session_id, consumer_id)
        if consumer.state(now) != "live":
            raise Conflict(f"consumer {consumer_id} has {consumer.state(now)}; register again")
        await conn.execute("UPDATE consumers SET lease_expires_at = ? WHERE id = ?",
                           (lease_until(now, lease_s, session.expires_at), consumer_id))
        return await _consumer_in(conn, session_id, consumer_id)
    return await store.write(body)


async def _consumer_in(conn: Conn, session_id: str, consumer_id: str) -> ConsumerRecord:
    row = await _one(conn, "SELECT * FROM consumers WHERE id = ? AND session_id = ?",
                     (consumer_id, session_id))
    if row is None:
        raise NotFound(f"session {session_id} has no consumer {consumer_id!r}")
    return _record(ConsumerRecord, row)


async def leave(store: Store, session_id: str, consumer_id: str, now: float) -> ConsumerRecord:
    """Mark the consumer gone (idempotent: the first time stays)."""
    async def body(conn: Conn) -> ConsumerRecord:
        cursor = await conn.execute("UPDATE consumers SET left_at = COALESCE(left_at, ?) "
                                    "WHERE id = ? AND session_id = ? RETURNING *",
                                    (now, consumer_id, session_id))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"session {session_id} has no consumer {consumer_id!r}")
        return _record(ConsumerRecord, row)
    return await store.write(body)


async def list_consumers(store: Store, session_id: str) -> list[ConsumerRecord]:
    rows = await store.read("SELECT * FROM consumers WHERE session_id = ? "
                            "ORDER BY registered_at, id", (session_id,))
    return [_record(ConsumerRecord, row) for row in rows]


async def insert_job(store: Store, job: JobRecord) -> None:
    async def body(conn: Conn) -> None:
        await _insert(conn, "jobs", job)
    await store.write(body)


async def get_job(store: Store, session_id: str, job_id: str) -> JobRecord | None:
    rows = await store.read("SELECT * FROM jobs WHERE id = ? AND session_id = ?",
                            (job_id, session_id))
    return _record(JobRecord, rows[0]) if rows else None


async def list_jobs(store: Store, session_id: str) -> list[JobRecord]:
    """The session's jobs in the order they were submitted."""
    rows = await store.read("SELECT * FROM jobs WHERE session_id = ? ORDER BY submitted_at, rowid",
                            (session_id,))
    return [_record(JobRecord, row) for row in rows]


async def unfinished_jobs(store: Store) -> list[JobRecord]:
    """Every job whose last stored state is not final, oldest first."""
    rows = await store.read("SELECT * FROM jobs WHERE state IN ('pending', 'running') "
                            "ORDER BY submitted_at, id", ())
    return [_record(JobRecord, row) for row in rows]


async def update_job_state(store: Store, job_id: str, status: JobStatus) -> None:
    """Store the job's new state; a final state is never replaced."""
    async def body(conn: Conn) -> None:
        await conn.execute("UPDATE jobs SET state = ?, exit_code = ?, detail = ? WHERE id = ? "
                           "AND state IN ('pending', 'running')",
                           (status.state, status.exit_code, status.detail, job_id))
    await store.write(body)


async def count_jobs(store: Store, session_id: str) -> int:
    rows = await store.read("SELECT COUNT(*) FROM jobs WHERE session_id = ?", (session_id,))
    return int(rows[0][0])


async def record_result(store: Store, result: ScanRecord) -> ScanRecord:
    """Store a scan's result once per source; the same report again returns the stored one, a
    different report for the same scan and source is a conflict (a result is a fact, never
    overwritten)."""
    async def body(conn: Conn) -> ScanRecord:
        row = await _one(conn, "SELECT * FROM scan_results WHERE session_id = ? AND scan = ? "
                         "AND source = ? AND lane = ?",
                         (result.session, result.scan, result.source, result.lane))
        if row is None:
            await _insert(conn, "scan_results", result)
            return result
        stored = _record(ScanRecord, row)
        if not stored.same_result(result):
            raise Conflict(f"scan {result.scan} of session {result.session} already has a "
                           "different result")
        return stored
    return await store.write(body)


async def list_results(store: Store, *, project: str | None, session_id: str | None,
                       limit: int, scan: int | None = None) -> list[ScanRecord]:
    rows = await store.read(
        "SELECT * FROM scan_results WHERE (CAST(?1 AS TEXT) IS NULL OR project = ?1) "
        "AND (CAST(?2 AS TEXT) IS NULL OR session_id = ?2) "
        "AND (CAST(?3 AS BIGINT) IS NULL OR scan = ?3) "
        "ORDER BY reported_at, session_id, scan, source, lane LIMIT ?4",
        (project, session_id, scan, limit))
    return [_record(ScanRecord, row) for row in rows]


async def live_sessions(store: Store, now: float, session_id: str | None = None
                        ) -> list[Placed]:
    """What the gateways must serve now: every open session (or just ``session_id``) whose
    session token is not revoked, with its live consumers in rank order, and its gateway."""
    rows = await store.read(
        "SELECT s.* FROM sessions s JOIN tokens t ON t.jti = s.token_jti WHERE s.ended_at IS NULL "
        "AND s.expires_at > ?1 AND t.revoked_at IS NULL "
        "AND (CAST(?2 AS TEXT) IS NULL OR s.id = ?2) "
        "ORDER BY s.created_at, s.id", (now, session_id))
    consumers = await store.read(
        "SELECT * FROM consumers WHERE left_at IS NULL AND lease_expires_at > ?1 "
        "AND (CAST(?2 AS TEXT) IS NULL OR session_id = ?2) ORDER BY rank, job_id",
        (now, session_id))
    endpoints: dict[str, list[str]] = {}
    for row in consumers:
        endpoints.setdefault(row["session_id"], []).append(row["endpoint"])
    sessions = (_gateway_session(_record(SessionRecord, row), endpoints.get(row["id"], []))
                for row in rows)
    return [session for session in sessions if session is not None]


def _gateway_session(record: SessionRecord, endpoints: Sequence[str]) -> Placed | None:
    try:
        config = parse_config(config_with_consumers(record.config, endpoints))
        return Placed(config.session(record.id), record.gateways)
    except ConfigError as exc:
        # Validated when rendered; a stored config that no longer validates is not served.
        log.error("session %s cannot be published: %s", record.id, exc)
        return None

