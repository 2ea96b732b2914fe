"""The store's engine: one SQLite database in the state directory, its connections, its group
commit and its error mapping. It holds no feature's SQL: the repositories beside it do.

SQLite runs in WAL mode behind aiosqlite, so the event loop never blocks on disk. The schema is
versioned with ``PRAGMA user_version``: ``MIGRATIONS[i]`` (in ``migrations``) upgrades a database
from version ``i`` to ``i + 1`` and every pending step runs, in order and in its own transaction,
when the store opens. A database written by a newer release is refused, never guessed at.

Two connections. Reads run on a query-only connection, one statement each, so every read sees
committed data only and never waits behind a write (WAL readers do not block on the writer).
Writes are group-committed: a caller queues its transaction body and awaits a future; one writer
task takes everything queued meanwhile (up to ``MAX_BATCH``) and runs it in ONE ``BEGIN
IMMEDIATE`` transaction, so one fsync makes the whole batch durable, and only then answers each
caller. Each queued write runs under its own savepoint, so its failure undoes only its own
changes. Grouped writes (``write_grouped``) queued for the same body run together instead, under
one savepoint: that is how audit appends of a batch extend the chain together (one head read, one
insert, one head move). If the transaction itself fails, every caller of the batch gets
``Unavailable``: nothing of it was written.

A short ``busy_timeout`` turns a lock held by another process into ``Unavailable`` (503 with
``Retry-After``) instead of a hang; any other SQLite failure is ``Unavailable`` too, so callers fail
closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from common.privatefs import PrivatePathError, private_dir
from controlplane.errors import ConfigurationError, Unavailable
from controlplane.store.migrations import MIGRATIONS, SCHEMA_VERSION

# The package's name, not this module's: log filters name the store, not how it is laid out.
log = logging.getLogger("controlplane.store")

T = TypeVar("T")
ItemT = TypeVar("ItemT")

DEFAULT_BUSY_TIMEOUT_S = 2.0
# Bounds one transaction, so a burst cannot grow the batch (and its latency) without limit.
MAX_BATCH = 256


def _is_lock_error(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def _unavailable(exc: BaseException, busy_timeout_s: float) -> Unavailable:
    if isinstance(exc, sqlite3.Error) and _is_lock_error(exc):
        return Unavailable("store is busy (locked by another writer); retry shortly",
                           retry_after_s=max(1, round(busy_timeout_s)))
    return Unavailable("store unavailable")


# SQLite may hand a whole-number REAL back as an int (RETURNING does); times are always floats,
# which matters to the audit hash, where 1 and 1.0 serialise differently.
def time_or_none(value: float | None) -> float | None:
    """A nullable time column as a float (or None), whatever type SQLite handed back."""
    return None if value is None else float(value)


Conn = aiosqlite.Connection
# A grouped write's body: given the items queued for it in one batch (in queue order), it returns
# one result per item.
GroupBody = Callable[[list[Any], Conn], Awaitable[list[Any]]]


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
    try:
        os.chmod(path, 0o600)
    except OSError as exc:  # a read-only file system, say: the service could record nothing
        raise ConfigurationError(f"the state database {path} cannot be written: "
                                 f"{exc.strerror}") from None


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


@dataclass(frozen=True)
class _Write:
    """One caller's transaction body, waiting for the writer's next batch."""

    body: Callable[[Conn], Awaitable[Any]]
    done: asyncio.Future[Any]


@dataclass(frozen=True)
class _Grouped:
    """One item for a body that runs once over all the items of a batch queued for it."""

    body: GroupBody
    item: Any
    done: asyncio.Future[Any]


_Job = _Write | _Grouped
# A waiter and what it will be told once the batch has committed: a result, or an error.
_Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]


async def _single(body: Callable[[Conn], Awaitable[T]], conn: Conn) -> list[T]:
    return [await body(conn)]


def _groups(batch: list[_Job]) -> dict[GroupBody, list[_Grouped]]:
    """The batch's grouped writes by body, each group and its items in queue order."""
    groups: dict[GroupBody, list[_Grouped]] = {}
    for job in batch:
        if isinstance(job, _Grouped):
            groups.setdefault(job.body, []).append(job)
    return groups


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
        """Open (creating it and its 0700 directory if needed) and migrate the database at
        ``path``."""
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
        domain errors pass, SQLite errors become 503. Every repository writes through this (or
        ``write_grouped``), so every write shares the group commit."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Write(body, done))
        return await done

    async def write_grouped(self, body: Callable[[list[ItemT], Conn], Awaitable[list[T]]],
                            item: ItemT) -> T:
        """Queue ``item`` for ``body``, which runs once in the writer's next transaction over
        every item queued for it meanwhile, in queue order, under one savepoint, and returns one
        result per item; return this item's once committed. If ``body`` fails, every item of the
        group gets its error (as from ``write``) and none of them is written."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Grouped(body, item, done))
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
        for body, group in _groups(batch).items():
            settlements += await self._savepoint(
                conn, partial(body, [job.item for job in group]), [job.done for job in group])
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
