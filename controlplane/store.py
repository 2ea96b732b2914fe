"""The control plane's persistent state: one SQLite database in the state directory.

SQLite runs in WAL mode behind aiosqlite, so the event loop never blocks on disk. The schema is
versioned with ``PRAGMA user_version``: ``MIGRATIONS[i]`` upgrades a database from version ``i`` to
``i + 1`` and every pending step runs, in order and in its own transaction, when the store opens. A
database written by a newer release is refused, never guessed at.

Two connections. Reads run on a query-only connection, one statement each, so every read sees
committed data only and never waits behind a write (WAL readers do not block on the writer).
Writes are group-committed: a caller queues its transaction body and awaits a future; one writer
task takes everything queued meanwhile (up to ``MAX_BATCH``) and runs it in ONE ``BEGIN
IMMEDIATE`` transaction, so one fsync makes the whole batch durable, and only then answers each
caller. Each queued write runs under its own savepoint, so its failure undoes only its own
changes; audit appends of a batch extend the chain together (one head read, one insert, one head
move). If the transaction itself fails, every caller of the batch gets ``Unavailable``: nothing of
it was written.

A short ``busy_timeout`` turns a lock held by another process into ``Unavailable`` (503 with
``Retry-After``) instead of a hang; any other SQLite failure is ``Unavailable`` too, so callers fail
closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import astuple, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from common.privatefs import PrivatePathError, private_dir
from controlplane.errors import ConfigurationError, Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUSY_TIMEOUT_S = 2.0
# Bounds one transaction, so a burst cannot grow the batch (and its latency) without limit.
MAX_BATCH = 256

# Ordered schema steps; never edit a released step, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: projects, issued tokens (metadata only, never the token), public signing keys.
    (
        """CREATE TABLE projects (
            name TEXT PRIMARY KEY,
            allowed_templates TEXT NOT NULL,
            quotas TEXT NOT NULL,
            not_before REAL,
            created_at REAL NOT NULL)""",
        """CREATE TABLE tokens (
            jti TEXT PRIMARY KEY,
            project TEXT,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            scope TEXT NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL,
            parent_jti TEXT REFERENCES tokens(jti))""",
        "CREATE INDEX tokens_by_project ON tokens(project, expires_at)",
        """CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            retired_at REAL,
            public_jwk TEXT NOT NULL)""",
    ),
    # 1 -> 2: the hash-chained audit log and its head, kept apart so a deleted tail shows.
    (
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            principal TEXT NOT NULL,
            action TEXT NOT NULL,
            resource TEXT NOT NULL,
            decision TEXT NOT NULL,
            rule TEXT NOT NULL,
            request_id TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)""",
        """CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL)""",
    ),
    # 2 -> 3: template versions, append-only; the current one is the highest, a tombstone
    # (deleted = 1, empty source) hides the template while its history stays.
    (
        """CREATE TABLE template_versions (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            author TEXT NOT NULL,
            created_at REAL NOT NULL,
            deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
            PRIMARY KEY (name, version))""",
    ),
    # 3 -> 4: streaming sessions (rendered config as JSON), consumer leases, consumer jobs and
    # scan results (one per session and scan). State and leases are judged against the clock.
    (
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            template TEXT NOT NULL,
            template_version INTEGER NOT NULL,
            params TEXT NOT NULL,
            client_key TEXT NOT NULL,
            config TEXT NOT NULL,
            token_jti TEXT NOT NULL REFERENCES tokens(jti),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            ended_at REAL)""",
        "CREATE INDEX sessions_by_project ON sessions(project, expires_at)",
        "CREATE INDEX sessions_by_client_key ON sessions(client_key, expires_at)",
        """CREATE TABLE consumers (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id),
            job_id TEXT NOT NULL,
            rank INTEGER NOT NULL,
            endpoint TEXT NOT NULL,
            host TEXT NOT NULL,
            registered_at REAL NOT NULL,
            lease_expires_at REAL NOT NULL,
            left_at REAL)""",
        "CREATE INDEX consumers_by_session ON consumers(session_id, lease_expires_at)",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id),
            template TEXT NOT NULL,
            template_version INTEGER NOT NULL,
            launcher TEXT NOT NULL,
            native_id TEXT NOT NULL,
            workdir TEXT NOT NULL,
            ranks INTEGER NOT NULL,
            token_jti TEXT NOT NULL REFERENCES tokens(jti),
            submitted_at REAL NOT NULL)""",
        "CREATE INDEX jobs_by_session ON jobs(session_id)",
        """CREATE TABLE scan_results (
            session_id TEXT NOT NULL REFERENCES sessions(id),
            scan INTEGER NOT NULL,
            project TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            frames INTEGER NOT NULL,
            events INTEGER NOT NULL,
            expected_sectors INTEGER NOT NULL,
            received_sectors INTEGER NOT NULL,
            duplicate_sectors INTEGER NOT NULL,
            lost_sectors INTEGER NOT NULL,
            incomplete_frames INTEGER NOT NULL,
            status TEXT NOT NULL,
            reported_at REAL NOT NULL,
            PRIMARY KEY (session_id, scan))""",
        "CREATE INDEX scan_results_by_project ON scan_results(project, reported_at)",
    ),
    # 4 -> 5: a scan may also be reported by the gateway (``source``), which interrupted it when a
    # consumer left mid-scan: the key gains the source, and gateway reports carry the sectors
    # spooled, the losses by reason and the loss manifest itself (JSON); ``reason`` says why a
    # scan failed (its file could not be written) or was interrupted.
    (
        """CREATE TABLE scan_results_v5 (
            session_id TEXT NOT NULL REFERENCES sessions(id),
            scan INTEGER NOT NULL,
            project TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            frames INTEGER NOT NULL,
            events INTEGER NOT NULL,
            expected_sectors INTEGER NOT NULL,
            received_sectors INTEGER NOT NULL,
            duplicate_sectors INTEGER NOT NULL,
            lost_sectors INTEGER NOT NULL,
            incomplete_frames INTEGER NOT NULL,
            status TEXT NOT NULL,
            reported_at REAL NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('consumer', 'gateway')),
            spooled_sectors INTEGER NOT NULL,
            lost_by_reason TEXT NOT NULL,
            loss_manifest TEXT NOT NULL,
            manifest_truncated INTEGER NOT NULL CHECK (manifest_truncated IN (0, 1)),
            reason TEXT,
            PRIMARY KEY (session_id, scan, source))""",
        """INSERT INTO scan_results_v5 SELECT session_id, scan, project, path, sha256, frames,
            events, expected_sectors, received_sectors, duplicate_sectors, lost_sectors,
            incomplete_frames, status, reported_at, 'consumer', 0, '{}', '[]', 0, NULL
            FROM scan_results""",
        "DROP TABLE scan_results",
        "ALTER TABLE scan_results_v5 RENAME TO scan_results",
        "CREATE INDEX scan_results_by_project ON scan_results(project, reported_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Project:
    name: str
    allowed_templates: tuple[str, ...] = ()
    quotas: dict[str, int] = field(default_factory=dict)
    not_before: float | None = None
    created_at: float = 0.0


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


@dataclass(frozen=True)
class SigningKeyRecord:
    kid: str
    created_at: float
    retired_at: float | None
    public_jwk: dict[str, str]


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: float
    principal: str
    action: str
    resource: str
    decision: str
    rule: str
    request_id: str
    prev_hash: str
    hash: str


def _is_lock_error(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def _unavailable(exc: BaseException, busy_timeout_s: float) -> Unavailable:
    if isinstance(exc, sqlite3.Error) and _is_lock_error(exc):
        return Unavailable("store is busy (locked by another writer); retry shortly",
                           retry_after_s=max(1, round(busy_timeout_s)))
    return Unavailable("store unavailable")


# SQLite may hand a whole-number REAL back as an int (RETURNING does); times are always floats,
# which matters to the audit hash, where 1 and 1.0 serialise differently.
def _time(value: float | None) -> float | None:
    return None if value is None else float(value)


def _project(row: sqlite3.Row) -> Project:
    return Project(name=row["name"], allowed_templates=tuple(json.loads(row["allowed_templates"])),
                   quotas=dict(json.loads(row["quotas"])), not_before=_time(row["not_before"]),
                   created_at=float(row["created_at"]))


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(jti=row["jti"], project=row["project"], kind=row["kind"],
                       subject=row["subject"], scope=row["scope"],
                       issued_at=float(row["issued_at"]), expires_at=float(row["expires_at"]),
                       revoked_at=_time(row["revoked_at"]), parent_jti=row["parent_jti"])


def _signing_key(row: sqlite3.Row) -> SigningKeyRecord:
    return SigningKeyRecord(kid=row["kid"], created_at=float(row["created_at"]),
                            retired_at=_time(row["retired_at"]),
                            public_jwk=json.loads(row["public_jwk"]))


def _audit(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord(seq=int(row["seq"]), ts=float(row["ts"]), principal=row["principal"],
                       action=row["action"], resource=row["resource"], decision=row["decision"],
                       rule=row["rule"], request_id=row["request_id"], prev_hash=row["prev_hash"],
                       hash=row["hash"])


Conn = aiosqlite.Connection
AuditBuilder = Callable[[int, str | None], AuditRecord]


async def _connect(path: Path, busy_timeout_s: float) -> Conn:
    try:
        # Autocommit at the driver level: transactions are explicit BEGIN IMMEDIATE ... COMMIT.
        conn = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot open the state database {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    except sqlite3.DatabaseError as exc:
        await conn.close()
        raise ConfigurationError(f"{path} is not a usable SQLite database: {exc}") from exc
    return conn


async def _prepare_writer(conn: Conn, path: Path, busy_timeout_s: float) -> None:
    try:
        await conn.execute("PRAGMA journal_mode = WAL")
        # FULL, not NORMAL: with WAL, NORMAL syncs only at checkpoints, so a power cut could take
        # back transactions already committed: an audit record of a decision already answered, a
        # revocation already confirmed. FULL syncs the WAL at every commit; group commit makes that
        # one fsync per batch instead of one per request, which is where the time went.
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
        version = await _user_version(conn)
    except sqlite3.DatabaseError as exc:
        raise ConfigurationError(f"{path} is not a usable SQLite database: {exc}") from exc
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"{path} has schema version {version}, newer than this release supports "
            f"({SCHEMA_VERSION}); upgrade dsn-gateway or use another state directory")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await _migrate(conn, target, busy_timeout_s)
    os.chmod(path, 0o600)


async def _prepare_reader(conn: Conn, path: Path) -> None:
    try:
        # A write sent here by mistake fails instead of slipping past the writer's transactions.
        await conn.execute("PRAGMA query_only = ON")
    except sqlite3.DatabaseError as exc:
        raise ConfigurationError(f"{path} is not a usable SQLite database: {exc}") from exc


async def _user_version(conn: Conn) -> int:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _migrate(conn: Conn, target: int, busy_timeout_s: float) -> None:
    async def step(c: Conn) -> None:
        for statement in MIGRATIONS[target - 1]:
            await c.execute(statement)
        # PRAGMA user_version is transactional: the step and its version commit together.
        await c.execute(f"PRAGMA user_version = {target}")
    log.info("migrating the state database to schema version %d", target)
    try:
        await _transaction(conn, step)
    except (sqlite3.Error, ValueError) as exc:
        raise _logged_unavailable(exc, busy_timeout_s) from exc


async def _transaction(conn: Conn, body: Callable[[Conn], Awaitable[T]]) -> T:
    """Run ``body`` in one BEGIN IMMEDIATE transaction; on any failure roll back and re-raise."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        result = await body(conn)
        await conn.execute("COMMIT")
    except BaseException:
        await _rollback(conn)
        raise
    return result


async def _rollback(conn: Conn) -> None:
    try:
        await conn.execute("ROLLBACK")
    except (sqlite3.Error, ValueError):
        log.warning("rollback failed; the connection may be unusable", exc_info=True)


def _logged_unavailable(exc: BaseException, busy_timeout_s: float) -> Unavailable:
    # The SQLite message holds no secrets; it goes to the log, not to the caller.
    log.warning("store operation failed: %s: %s", type(exc).__name__, exc)
    return _unavailable(exc, busy_timeout_s)


async def _append_chain(builds: Sequence[AuditBuilder], conn: Conn) -> list[AuditRecord]:
    """Chain ``builds`` in order onto the head, read inside the write transaction so appends from
    other processes sharing the database still form a single chain; then move the head once."""
    async with conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1") as cursor:
        head = await cursor.fetchone()
    seq, prev = (0, None) if head is None else (int(head["seq"]), str(head["hash"]))
    records = []
    for build in builds:
        record = build(seq + 1, prev)
        records.append(record)
        seq, prev = record.seq, record.hash
    # AuditRecord's fields are declared in the table's column order.
    await conn.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [astuple(record) for record in records])
    await conn.execute("INSERT INTO audit_head VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE "
                       "SET seq = excluded.seq, hash = excluded.hash", (seq, prev))
    return records


@dataclass(frozen=True)
class _Write:
    """One caller's transaction body, waiting for the writer's next batch."""

    body: Callable[[Conn], Awaitable[Any]]
    done: asyncio.Future[Any]


@dataclass(frozen=True)
class _Append:
    """One audit record to chain, waiting for the writer's next batch."""

    build: AuditBuilder
    done: asyncio.Future[AuditRecord]


_Job = _Write | _Append
# A waiter and what it will be told once the batch has committed: a result, or an error.
_Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]


async def _single(body: Callable[[Conn], Awaitable[T]], conn: Conn) -> list[T]:
    return [await body(conn)]


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():  # the caller was cancelled; its write stands, nobody is left to tell
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


class Store:
    """Async access to the control plane database; open with ``await Store.open(path)``."""

    def __init__(self, writer: Conn, reader: Conn, busy_timeout_s: float) -> None:
        self._conn = writer  # used by the writer task alone
        self._reader = reader
        self._busy_timeout_s = busy_timeout_s
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Store:
        """Open (creating it and its 0700 directory if needed) and migrate the database at ``path``."""
        try:
            private_dir(path.parent)
        except PrivatePathError as exc:
            raise ConfigurationError(f"state directory: {exc}") from None
        async with AsyncExitStack() as on_failure:
            writer = await _connect(path, busy_timeout_s)
            on_failure.push_async_callback(writer.close)
            await _prepare_writer(writer, path, busy_timeout_s)
            reader = await _connect(path, busy_timeout_s)
            on_failure.push_async_callback(reader.close)
            await _prepare_reader(reader, path)
            on_failure.pop_all()
        store = cls(writer, reader, busy_timeout_s)
        store._writer = asyncio.create_task(store._run_writer(), name="controlplane-store-writer")
        return store

    async def close(self) -> None:
        """Take no more writes, commit (or fail) those queued, then close both connections."""
        self._closing = True
        self._wakeup.set()
        try:
            if self._writer is not None:
                await self._writer
        finally:
            await self._reader.close()
            await self._conn.close()

    # -- the writer ---------------------------------------------------------------------------

    async def write(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``body`` in the writer's next transaction and return once that has committed;
        domain errors pass, SQLite errors become 503. Repositories of other modules (templates,
        sessions) write through this too, so every write shares the group commit."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Write(body, done))
        return await done

    def _submit(self, job: _Job) -> None:
        if self._closing:
            raise Unavailable("store is closed")
        self._pending.append(job)
        self._wakeup.set()

    async def _run_writer(self) -> None:
        """Commit batches until closed and drained; whatever arrives during a commit is the next
        batch, so batches grow with the load and an idle store adds no delay."""
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = [self._pending.popleft()
                         for _ in range(min(len(self._pending), MAX_BATCH))]
                await self._commit(batch)
        finally:
            # Jobs are left only if this task was cancelled: fail them rather than strand them.
            self._closing = True
            while self._pending:
                _settle(self._pending.popleft().done, None, Unavailable("store is closed"))

    async def _commit(self, batch: list[_Job]) -> None:
        """Run ``batch`` in one transaction (one fsync), then answer every waiter."""
        try:
            settlements = await _transaction(self._conn, partial(self._run_jobs, batch))
        except BaseException as exc:
            # Nothing of the batch was written: every waiter hears so, each with its own error.
            log.warning("store transaction failed: %s: %s", type(exc).__name__, exc)
            failed = list(batch)
            if isinstance(exc, sqlite3.Error) and _is_lock_error(exc):
                # The lock outlived the busy timeout: what queued meanwhile would wait it out
                # again before its 503; answer it now (each carries Retry-After).
                failed += self._pending
                self._pending.clear()
            for job in failed:
                _settle(job.done, None, _unavailable(exc, self._busy_timeout_s))
            if not isinstance(exc, Exception):
                raise
            return
        log.debug("committed %d writes in one transaction", len(batch))
        for done, result, error in settlements:
            _settle(done, result, error)

    async def _run_jobs(self, batch: list[_Job], conn: Conn) -> list[_Settlement]:
        # Order across jobs is free: no caller hears of any of them until all have committed.
        settlements: list[_Settlement] = []
        for job in batch:
            if isinstance(job, _Write):
                settlements += await self._savepoint(conn, partial(_single, job.body), [job.done])
        appends = [job for job in batch if isinstance(job, _Append)]
        if appends:
            settlements += await self._savepoint(
                conn, partial(_append_chain, [job.build for job in appends]),
                [job.done for job in appends])
        return settlements

    async def _savepoint(self, conn: Conn, body: Callable[[Conn], Awaitable[list[Any]]],
                         waiters: list[asyncio.Future[Any]]) -> list[_Settlement]:
        """Run ``body`` (one result per waiter) so that its failure undoes only its own writes."""
        await conn.execute("SAVEPOINT job")
        try:
            results = await body(conn)
        except Exception as exc:  # noqa: BLE001 - handed to its waiter, who raises it
            # Raises if SQLite has already rolled the whole transaction back: the batch then fails.
            await conn.execute("ROLLBACK TO job")
            await conn.execute("RELEASE job")
            if isinstance(exc, (sqlite3.Error, ValueError)):
                log.warning("store write failed: %s: %s", type(exc).__name__, exc)
            return [(done, None, self._error(exc)) for done in waiters]
        await conn.execute("RELEASE job")
        return [(done, result, None) for done, result in zip(waiters, results, strict=True)]

    def _error(self, exc: Exception) -> Exception:
        """What a waiter is told: its domain error as raised, SQLite trouble as 503."""
        if isinstance(exc, (sqlite3.Error, ValueError)):
            return _unavailable(exc, self._busy_timeout_s)
        return exc

    # -- reads --------------------------------------------------------------------------------

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One statement on the reader connection: a snapshot of committed data, taken at once."""
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:
            raise _logged_unavailable(exc, self._busy_timeout_s) from exc

    # -- projects -----------------------------------------------------------------------------

    async def create_project(self, p: Project) -> None:
        async def body(conn: Conn) -> None:
            cursor = await conn.execute(
                "INSERT INTO projects VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO NOTHING",
                (p.name, json.dumps(list(p.allowed_templates)), json.dumps(p.quotas),
                 p.not_before, p.created_at))
            if cursor.rowcount == 0:
                raise Conflict(f"project {p.name!r} already exists")
        await self.write(body)

    async def get_project(self, name: str) -> Project | None:
        rows = await self.read("SELECT * FROM projects WHERE name = ?", (name,))
        return _project(rows[0]) if rows else None

    async def list_projects(self) -> list[Project]:
        return [_project(row) for row in await self.read("SELECT * FROM projects ORDER BY name")]

    async def update_project(self, name: str, *, allowed_templates: Sequence[str] | None = None,
                             quotas: dict[str, int] | None = None,
                             not_before: float | None = None) -> Project:
        """Change the given fields (``None`` leaves a field as it is); NotFound if no such project."""
        async def body(conn: Conn) -> Project:
            cursor = await conn.execute(
                "UPDATE projects SET allowed_templates = COALESCE(?, allowed_templates), "
                "quotas = COALESCE(?, quotas), not_before = COALESCE(?, not_before) "
                "WHERE name = ? RETURNING *",
                (None if allowed_templates is None else json.dumps(list(allowed_templates)),
                 None if quotas is None else json.dumps(quotas), not_before, name))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"project {name!r} does not exist")
            return _project(row)
        return await self.write(body)

    # -- tokens -------------------------------------------------------------------------------

    async def add_token(self, rec: TokenRecord) -> None:
        """Remember an issued token; Conflict on a reused jti, NotFound for an unknown parent."""
        async def body(conn: Conn) -> None:
            if rec.parent_jti is not None:
                async with conn.execute("SELECT 1 FROM tokens WHERE jti = ?",
                                        (rec.parent_jti,)) as found:
                    if await found.fetchone() is None:
                        raise NotFound(f"parent token {rec.parent_jti!r} does not exist")
            cursor = await conn.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(jti) DO NOTHING",
                (rec.jti, rec.project, rec.kind, rec.subject, rec.scope, rec.issued_at,
                 rec.expires_at, rec.revoked_at, rec.parent_jti))
            if cursor.rowcount == 0:
                raise Conflict(f"token id {rec.jti!r} already exists")
        await self.write(body)

    async def get_token(self, jti: str) -> TokenRecord | None:
        rows = await self.read("SELECT * FROM tokens WHERE jti = ?", (jti,))
        return _token(rows[0]) if rows else None

    async def list_tokens(self, project: str) -> list[TokenRecord]:
        rows = await self.read(
            "SELECT * FROM tokens WHERE project = ? ORDER BY issued_at, jti", (project,))
        return [_token(row) for row in rows]

    async def count_live_tokens(self, project: str, now: float) -> int:
        """Tokens of ``project`` that are unexpired, unrevoked and not older than its not_before."""
        rows = await self.read(
            "SELECT COUNT(*) FROM tokens t JOIN projects p ON p.name = t.project "
            "WHERE t.project = ? AND t.revoked_at IS NULL AND t.expires_at > ? "
            "AND (p.not_before IS NULL OR t.issued_at >= p.not_before)", (project, now))
        return int(rows[0][0])

    async def revoke_token(self, jti: str, at: float) -> TokenRecord:
        """Revoke ``jti``; idempotent (a second revoke keeps the first time); NotFound if unknown."""
        async def body(conn: Conn) -> TokenRecord:
            cursor = await conn.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE jti = ? RETURNING *",
                (at, jti))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"token {jti!r} does not exist")
            return _token(row)
        return await self.write(body)

    async def is_revoked(self, jti: str) -> bool:
        rows = await self.read(
            "SELECT 1 FROM tokens WHERE jti = ? AND revoked_at IS NOT NULL", (jti,))
        return bool(rows)

    # -- signing keys -------------------------------------------------------------------------

    async def add_signing_key(self, rec: SigningKeyRecord) -> None:
        async def body(conn: Conn) -> None:
            cursor = await conn.execute(
                "INSERT INTO signing_keys VALUES (?, ?, ?, ?) ON CONFLICT(kid) DO NOTHING",
                (rec.kid, rec.created_at, rec.retired_at, json.dumps(rec.public_jwk)))
            if cursor.rowcount == 0:
                raise Conflict(f"signing key {rec.kid!r} already exists")
        await self.write(body)

    async def list_signing_keys(self) -> list[SigningKeyRecord]:
        """All keys, retired ones included, oldest first."""
        rows = await self.read("SELECT * FROM signing_keys ORDER BY created_at, rowid")
        return [_signing_key(row) for row in rows]

    async def retire_signing_key(self, kid: str, at: float) -> SigningKeyRecord:
        """Retire ``kid``; idempotent (keeps the first time); NotFound if unknown."""
        async def body(conn: Conn) -> SigningKeyRecord:
            cursor = await conn.execute(
                "UPDATE signing_keys SET retired_at = COALESCE(retired_at, ?) WHERE kid = ? "
                "RETURNING *", (at, kid))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"signing key {kid!r} does not exist")
            return _signing_key(row)
        return await self.write(body)

    # -- audit chain (hashing lives in controlplane.audit) ------------------------------------

    async def append_audit(self, build: AuditBuilder) -> AuditRecord:
        """Append ``build(next_seq, head_hash)`` and move the chain head; return once committed.

        Appends queued together are chained in queue order in one transaction, the head read
        inside it, so appends from other processes sharing the database still form a single
        chain. ``head_hash`` is None for the first record. If the batch cannot be written, every
        append in it raises ``Unavailable`` and the chain is left as it was.
        """
        done: asyncio.Future[AuditRecord] = asyncio.get_running_loop().create_future()
        self._submit(_Append(build, done))
        return await done

    async def audit_head(self) -> tuple[int, str] | None:
        rows = await self.read("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else None

    async def list_audit(self, after_seq: int = 0, limit: int = 100) -> list[AuditRecord]:
        rows = await self.read("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                                (after_seq, limit))
        return [_audit(row) for row in rows]
