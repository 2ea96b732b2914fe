"""The SQLite backend (the default): one database file in the state directory, behind aiosqlite
so the event loop never blocks on disk, in WAL mode.

The schema is versioned with ``PRAGMA user_version``: every pending step of ``MIGRATIONS`` runs,
in order and in its own transaction, when the store opens; a database written by a newer release
is refused, never guessed at.

Two connections. Reads run on a query-only connection, one statement each, so every read sees
committed data only and never waits behind a write (WAL readers do not block on the writer).
Write transactions are ``BEGIN IMMEDIATE``: they hold the database's one write lock from their
start, which is also what serialises the writers of other processes sharing the file (``lock`` has
nothing to add). A short ``busy_timeout`` turns a lock held by another process into ``Unavailable``
(503 with ``Retry-After``) instead of a hang; any other SQLite failure is ``Unavailable`` too.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from common.privatefs import PrivatePathError, private_dir
from controlplane.errors import ConfigurationError
from controlplane.store.base import Conn, Execution, Row, unavailable
from controlplane.store.migrations import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("controlplane.store")

T = TypeVar("T")


class _SqliteConn:
    """The writer connection as transaction bodies see it."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Execution:
        return self._conn.execute(sql, parameters)

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        return await self._conn.executemany(sql, parameters)

    async def lock(self, name: str) -> None:
        """Nothing to take: BEGIN IMMEDIATE holds the database's write lock already."""


async def _connect(path: Path, busy_timeout_s: float) -> aiosqlite.Connection:
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


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


class SqliteBackend:
    """A database file; open with ``await SqliteBackend.open(path, busy_timeout_s)``."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection,
                 busy_timeout_s: float) -> None:
        self._path = path
        self._writer = writer
        self._reader = reader
        self.busy_timeout_s = busy_timeout_s

    @classmethod
    async def open(cls, path: Path, busy_timeout_s: float) -> SqliteBackend:
        """Open (creating it and its 0700 directory if needed) and migrate the database."""
        try:
            private_dir(path.parent)
        except PrivatePathError as exc:
            raise ConfigurationError(f"state directory: {exc}") from None
        async with AsyncExitStack() as on_failure:
            writer = await _connect(path, busy_timeout_s)
            on_failure.push_async_callback(writer.close)
            reader = await _connect(path, busy_timeout_s)
            on_failure.push_async_callback(reader.close)
            backend = cls(path, writer, reader, busy_timeout_s)
            await backend._prepare_writer()
            await backend._prepare_reader()
            on_failure.pop_all()
        return backend

    async def _prepare_writer(self) -> None:
        conn, path = self._writer, self._path
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            # FULL, not NORMAL: with WAL, NORMAL syncs only at checkpoints, so a power cut could
            # take back transactions already committed: an audit record of a decision already
            # answered, a revocation already confirmed. FULL syncs the WAL at every commit; group
            # commit makes that one fsync per batch instead of one per request.
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA foreign_keys = ON")
            version = await self._user_version()
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"{path} is not a usable SQLite database: {exc}") from exc
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{path} has schema version {version}, newer than this release supports "
                f"({SCHEMA_VERSION}); upgrade dsn-gateway or use another state directory")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self._migrate(target)
        try:
            os.chmod(path, 0o600)
        except OSError as exc:  # a read-only file system, say: the service could record nothing
            raise ConfigurationError(f"the state database {path} cannot be written: "
                                     f"{exc.strerror}") from None

    async def _prepare_reader(self) -> None:
        try:
            # A write sent here by mistake fails instead of slipping past the writer's
            # transactions.
            await self._reader.execute("PRAGMA query_only = ON")
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(
                f"{self._path} is not a usable SQLite database: {exc}") from exc

    async def _user_version(self) -> int:
        async with self._writer.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _migrate(self, target: int) -> None:
        async def step(c: Conn) -> None:
            for statement in MIGRATIONS[target - 1]:
                await c.execute(statement)
            # PRAGMA user_version is transactional: the step and its version commit together.
            await c.execute(f"PRAGMA user_version = {target}")
        log.info("migrating the state database to schema version %d", target)
        try:
            await self.transaction(step)
        except (sqlite3.Error, ValueError) as exc:
            log.warning("store operation failed: %s: %s", type(exc).__name__, exc)
            raise unavailable(self, exc) from exc

    async def transaction(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``body`` in one BEGIN IMMEDIATE transaction; on any failure roll back and
        re-raise."""
        await self._writer.execute("BEGIN IMMEDIATE")
        try:
            result = await body(_SqliteConn(self._writer))
            await self._writer.execute("COMMIT")
        except BaseException:
            try:
                await self._writer.execute("ROLLBACK")
            except (sqlite3.Error, ValueError):
                log.warning("rollback failed; the connection may be unusable", exc_info=True)
            raise
        return result

    async def read(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return list(await self._reader.execute_fetchall(sql, params))

    def is_failure(self, exc: BaseException) -> bool:
        # aiosqlite raises ValueError on a closed connection.
        return isinstance(exc, (sqlite3.Error, ValueError))

    def is_busy(self, exc: BaseException) -> bool:
        return _is_lock_error(exc)

    async def close(self) -> None:
        try:
            await self._reader.close()
        finally:
            await self._writer.close()
