"""The store's two databases as a test reaches them from outside the store: another process's
connection, to look at what was committed, tamper with it, make it fail or hold a lock.

``SqliteDatabase`` is the file in the state directory; ``PostgresDatabase`` a fresh database on the
session's PostgreSQL server (``postgres_server``). Tests written against ``Database`` run on both
(the ``database`` fixture in conftest is parametrised over them).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from controlplane.store.dialect import to_postgresql


class Database(Protocol):
    engine: str

    @property
    def location(self) -> Path | str:
        """What ``Store.open`` is given."""

    def native(self, sql: str) -> str:
        """``sql``, written as the store's migrations and repositories are, as this engine runs
        it."""

    async def sql(self, *statements: str) -> list[tuple[Any, ...]]:
        """Run ``statements`` in one transaction on a connection of their own; the last one's
        rows."""

    async def fail_writes(self, name: str, when: str, condition: str | None = None) -> None:
        """Make the database refuse, with an error of its own, the writes ``when`` names (``BEFORE
        INSERT ON audit``), those matching ``condition`` (on ``NEW``) if given."""

    async def allow_writes(self, name: str, table: str) -> None:
        """Undo ``fail_writes(name, ...)`` on ``table``."""

    def write_locked(self, tables: Sequence[str]) -> Any:
        """An async context in which another connection holds what keeps the store from writing
        ``tables`` (reads go on)."""

    async def set_schema_version(self, version: int) -> None: ...

    async def schema_version(self) -> int: ...


@dataclass
class SqliteDatabase:
    path: Path
    engine: str = "sqlite"

    @property
    def location(self) -> Path:
        return self.path

    def native(self, sql: str) -> str:
        return sql

    async def sql(self, *statements: str) -> list[tuple[Any, ...]]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with sqlite3.connect(self.path) as conn:
            rows: list[tuple[Any, ...]] = []
            for statement in statements:
                rows = [tuple(row) for row in conn.execute(statement).fetchall()]
        return rows

    async def fail_writes(self, name: str, when: str, condition: str | None = None) -> None:
        guard = f" WHEN {condition}" if condition else ""
        await self.sql(f"CREATE TRIGGER {name} {when}{guard} "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END")

    async def allow_writes(self, name: str, table: str) -> None:
        await self.sql(f"DROP TRIGGER {name}")

    @asynccontextmanager
    async def write_locked(self, tables: Sequence[str]) -> AsyncIterator[None]:
        other = sqlite3.connect(self.path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # the one write lock of the whole file
            yield
            other.execute("ROLLBACK")
        finally:
            other.close()

    async def set_schema_version(self, version: int) -> None:
        await self.sql(f"PRAGMA user_version = {version}")

    async def schema_version(self) -> int:
        return int((await self.sql("PRAGMA user_version"))[0][0])


@dataclass
class PostgresDatabase:
    url: str
    engine: str = "postgresql"

    @property
    def location(self) -> str:
        return self.url

    def native(self, sql: str) -> str:
        return to_postgresql(sql)

    async def sql(self, *statements: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(self.url)
        try:
            rows: list[tuple[Any, ...]] = []
            async with conn.transaction():
                for statement in statements:
                    rows = [tuple(row) for row in await conn.fetch(statement)]
            return rows
        finally:
            await conn.close()

    async def fail_writes(self, name: str, when: str, condition: str | None = None) -> None:
        guard = f" WHEN ({condition})" if condition else ""
        await self.sql(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$BEGIN RAISE EXCEPTION 'refused'; END$$",
                       f"CREATE TRIGGER {name} {when} FOR EACH ROW{guard} "
                       f"EXECUTE FUNCTION {name}()")

    async def allow_writes(self, name: str, table: str) -> None:
        await self.sql(f"DROP TRIGGER {name} ON {table}", f"DROP FUNCTION {name}")

    @asynccontextmanager
    async def write_locked(self, tables: Sequence[str]) -> AsyncIterator[None]:
        other = await asyncpg.connect(self.url)
        try:
            async with other.transaction():
                # EXCLUSIVE: no other transaction writes these tables; SELECTs go on.
                await other.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
                yield
        finally:
            await other.close()

    async def set_schema_version(self, version: int) -> None:
        await self.sql("CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY "
                       "CHECK (id = 1), version INTEGER NOT NULL)",
                       "DELETE FROM schema_version",
                       f"INSERT INTO schema_version VALUES (1, {version})")

    async def schema_version(self) -> int:
        return int((await self.sql("SELECT version FROM schema_version"))[0][0])
