"""The PostgreSQL backend: the store of control planes that share one database
(``database_url``, ``postgresql://user@host/db``), so that several processes, on several
machines, serve the same state.

The driver is asyncpg: maintained, asyncio-native (no thread per connection), with its own
connection pool, so it needs no other package; its ``Record`` is read by column name and by
position as ``sqlite3.Row`` is, so the repositories read rows the same on both databases; and it
binds parameters as ``$N``, which the repositories' ``?N`` placeholders map onto one to one
(``dialect``). psycopg 3 would need a separate pool package, a row type of ours, and ``%``
escaped in every statement.

The writer is one connection, as with SQLite: the engine's group commit runs each batch there in
one ``BEGIN ... COMMIT`` (READ COMMITTED), each write under its savepoint. ``synchronous_commit``
is forced on for it, so a COMMIT returns only once the batch is durable, whatever the server's
default; ``lock_timeout`` is the busy timeout, so a lock another process holds too long is 503 with
``Retry-After``, not a hang. When the server has dropped the connection (a restart, a failover),
the next batch connects again; one sent before the loss was noticed fails (503), never silently.
Reads go to a small pool of read-only connections (a write sent there by mistake fails), one
autocommit statement each.

A deadlock or serialisation failure between processes is, like a lock timeout, 503 with
``Retry-After`` for the write it hit (its savepoint undone), worth retrying.

The schema version lives in a one-row ``schema_version`` table; each migration step takes an
advisory lock first, so control planes starting together against one database migrate it once.
``lock`` is a transaction-scoped advisory lock, held to the commit: what serialises the audit
chain's appenders across processes.

The URL's password is never logged nor put in an error: only ``redacted`` forms of the URL are.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg

from controlplane.errors import ConfigurationError
from controlplane.store.base import Conn, Cursor, Execution, Row, redacted
from controlplane.store.dialect import to_postgresql
from controlplane.store.migrations import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("controlplane.store")

T = TypeVar("T")

READ_POOL_SIZE = 4
_RETURNS_ROWS = re.compile(r"^\s*(SELECT|WITH|VALUES)\b|\bRETURNING\b", re.IGNORECASE)
_SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL)"""
_MIGRATION_LOCK = "controlplane schema migration"
# What is worth a retry: a lock held elsewhere past lock_timeout, or a transaction the server
# aborted to break a deadlock or a serialisation conflict between processes.
_BUSY = (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError,
         asyncpg.SerializationError)


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``, the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _rowcount(status: str) -> int:
    # The command tag: "UPDATE 3", "DELETE 0", "INSERT 0 1" (the last number counts the rows).
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class _PgCursor:
    def __init__(self, rows: list[asyncpg.Record], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    async def fetchone(self) -> asyncpg.Record | None:
        return self._rows.pop(0) if self._rows else None

    async def fetchall(self) -> Iterable[asyncpg.Record]:
        rows, self._rows = self._rows, []
        return rows


class _PgExecution:
    def __init__(self, conn: asyncpg.Connection, sql: str, parameters: Sequence[Any]) -> None:
        self._conn, self._sql, self._parameters = conn, sql, parameters

    async def _run(self) -> Cursor:
        if _RETURNS_ROWS.search(self._sql):
            rows = await self._conn.fetch(self._sql, *self._parameters)
            return _PgCursor(rows, len(rows))
        status = await self._conn.execute(self._sql, *self._parameters)
        return _PgCursor([], _rowcount(status))

    def __await__(self) -> Generator[Any, None, Cursor]:
        return self._run().__await__()

    async def __aenter__(self) -> Cursor:
        return await self._run()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None:
        return None


class _PgConn:
    """The writer connection as transaction bodies see it: SQLite's SQL, translated."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Execution:
        return _PgExecution(self._conn, to_postgresql(sql), parameters)

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        await self._conn.executemany(to_postgresql(sql), parameters)

    async def lock(self, name: str) -> None:
        await self._conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(name))


class PostgresBackend:
    """A PostgreSQL database; open with ``await PostgresBackend.open(url, busy_timeout_s)``."""

    def __init__(self, url: str, writer: asyncpg.Connection, readers: asyncpg.Pool,
                 busy_timeout_s: float) -> None:
        self._url = url
        self._writer = writer
        self._readers = readers
        self.busy_timeout_s = busy_timeout_s

    @classmethod
    async def open(cls, url: str, busy_timeout_s: float) -> PostgresBackend:
        """Connect to ``url`` and migrate its database; ConfigurationError if it cannot be
        reached or holds a newer schema."""
        try:
            writer = await cls._connect(url, busy_timeout_s)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise ConfigurationError(f"cannot connect to the database at {redacted(url)}: "
                                     f"{_reason(exc)}") from None
        try:
            await _migrate(writer, url)
            readers = await asyncpg.create_pool(
                url, min_size=1, max_size=READ_POOL_SIZE, timeout=busy_timeout_s + 8,
                server_settings={"default_transaction_read_only": "on",
                                 "application_name": "dsn-controlplane"})
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            await writer.close()
            raise ConfigurationError(f"cannot use the database at {redacted(url)}: "
                                     f"{_reason(exc)}") from None
        except BaseException:
            await writer.close()
            raise
        return cls(url, writer, readers, busy_timeout_s)

    @staticmethod
    async def _connect(url: str, busy_timeout_s: float) -> asyncpg.Connection:
        return await asyncpg.connect(url, timeout=busy_timeout_s + 8, server_settings={
            "synchronous_commit": "on",
            "lock_timeout": str(int(busy_timeout_s * 1000)),
            "application_name": "dsn-controlplane"})

    async def transaction(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``body`` in one transaction on the writer connection (connected again first if the
        server dropped it); on any failure roll back and re-raise."""
        if self._writer.is_closed():
            self._writer = await self._connect(self._url, self.busy_timeout_s)
        await self._writer.execute("BEGIN")
        try:
            result = await body(_PgConn(self._writer))
            await self._writer.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        return result

    async def _rollback(self) -> None:
        if self._writer.is_closed():
            return  # the server ended the transaction with the connection
        try:
            await self._writer.execute("ROLLBACK")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            log.warning("rollback failed; the connection is closed to start afresh",
                        exc_info=True)
            self._writer.terminate()

    async def read(self, sql: str, params: Sequence[Any]) -> list[Row]:
        rows: list[Row] = await self._readers.fetch(to_postgresql(sql), *params)
        return rows

    def is_failure(self, exc: BaseException) -> bool:
        # asyncpg.DataError (a value the column cannot take) is an InterfaceError.
        return isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                                TimeoutError))

    def is_busy(self, exc: BaseException) -> bool:
        return isinstance(exc, _BUSY)

    async def close(self) -> None:
        try:
            await self._readers.close()
        finally:
            await self._writer.close()


def _reason(exc: BaseException) -> str:
    # asyncpg's and the server's messages name the host, user and database, never the password.
    return str(exc) or type(exc).__name__


async def _migrate(conn: asyncpg.Connection, url: str) -> None:
    """Run every pending step, each in its own transaction under the migration lock, so that
    processes starting together run each step once; refuse a newer schema."""
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(_MIGRATION_LOCK))
            await conn.execute(to_postgresql(_SCHEMA_VERSION_TABLE))
            version = int(await conn.fetchval("SELECT version FROM schema_version") or 0)
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the database at {redacted(url)} has schema version {version}, newer than "
                    f"this release supports ({SCHEMA_VERSION}); upgrade dsn-gateway or use "
                    "another database")
            if version == SCHEMA_VERSION:
                return
            log.info("migrating the state database to schema version %d", version + 1)
            for statement in MIGRATIONS[version]:
                await conn.execute(to_postgresql(statement))
            await conn.execute("INSERT INTO schema_version VALUES (1, $1) ON CONFLICT (id) "
                               "DO UPDATE SET version = excluded.version", version + 1)
