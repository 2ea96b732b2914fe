"""The store's engine: its database (SQLite by default, PostgreSQL when given a database URL),
its group commit and its error mapping. It holds no feature's SQL: the repositories beside it do,
written once for both databases (``dialect``).

``Store.open`` takes a path, the SQLite file in the state directory (``sqlite``), or a
``postgresql://`` URL (``postgresql``). Either backend versions the schema, runs every pending step
of ``MIGRATIONS`` (in ``migrations``) when the store opens, each in its own transaction, and refuses
a database written by a newer release. Reads are single statements that see committed data only.

Writes are group-committed, the same on both: a caller queues its transaction body and awaits a
future; one writer task takes everything queued meanwhile (up to ``MAX_BATCH``) and runs it in ONE
transaction, so one durable commit (one fsync) covers the whole batch, and only then answers each
caller: nothing is answered before it is durable. Each queued write runs under its own savepoint,
so its failure undoes only its own changes. Grouped writes (``write_grouped``) queued for the same
body run together instead, under one savepoint: that is how audit appends of a batch extend the
chain together (one head read, one insert, one head move). If the transaction itself fails, every
caller of the batch gets ``Unavailable``: nothing of it was written.

A lock held by another process past a short busy timeout is ``Unavailable`` (503 with
``Retry-After``) instead of a hang; any other failure of the database is ``Unavailable`` too, so
callers fail closed. Domain errors raised by a body pass to its caller as raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from controlplane.errors import ConfigurationError, Unavailable
from controlplane.store.base import (
    DATABASE_URL_SCHEMES,
    Backend,
    Conn,
    Row,
    redacted,
    time_or_none,
    unavailable,
)
from controlplane.store.sqlite import SqliteBackend

__all__ = ["MAX_BATCH", "Conn", "Row", "Store", "time_or_none"]

# The package's name, not this module's: log filters name the store, not how it is laid out.
log = logging.getLogger("controlplane.store")

T = TypeVar("T")
ItemT = TypeVar("ItemT")

DEFAULT_BUSY_TIMEOUT_S = 2.0
# Bounds one transaction, so a burst cannot grow the batch (and its latency) without limit.
MAX_BATCH = 256

# A grouped write's body: given the items queued for it in one batch (in queue order), it returns
# one result per item.
GroupBody = Callable[[list[Any], Conn], Awaitable[list[Any]]]


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
    """Async access to the control plane database; open with ``await Store.open(location)``."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend  # its writes come from the writer task alone
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, location: Path | str, *,
                   busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Store:
        """Open and migrate the database at ``location``: a SQLite file's path (created, with its
        0700 directory, if needed) or the ``postgresql://`` URL of an existing database."""
        backend: Backend
        if isinstance(location, Path):
            backend = await SqliteBackend.open(location, busy_timeout_s)
        elif urlsplit(location).scheme in DATABASE_URL_SCHEMES:
            # Imported here: a SQLite deployment never loads the PostgreSQL driver.
            from controlplane.store.postgresql import PostgresBackend
            backend = await PostgresBackend.open(location, busy_timeout_s)
        else:
            raise ConfigurationError(f"{redacted(location)!r} is not a PostgreSQL URL "
                                     "(postgresql://USER@HOST/DB)")
        store = cls(backend)
        store._writer = asyncio.create_task(store._run_writer(), name="controlplane-store-writer")
        return store

    async def close(self) -> None:
        """Take no more writes, commit (or fail) those queued, then close the database."""
        self._closing = True
        self._wakeup.set()
        try:
            if self._writer is not None:
                await self._writer
        finally:
            await self._backend.close()

    # -- the writer ---------------------------------------------------------------------------

    async def write(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``body`` in the writer's next transaction and return once that has committed;
        domain errors pass, database errors become 503. Every repository writes through this (or
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
            settlements = await self._backend.transaction(partial(self._run_jobs, batch))
        except BaseException as exc:
            # Nothing of the batch was written: every waiter hears so, each with its own error.
            log.warning("store transaction failed: %s: %s", type(exc).__name__, exc)
            failed = list(batch)
            if self._backend.is_busy(exc):
                # The lock outlived the busy timeout: what queued meanwhile would wait it out
                # again before its 503; answer it now (each carries Retry-After).
                failed += self._pending
                self._pending.clear()
            for job in failed:
                _settle(job.done, None, unavailable(self._backend, exc))
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
            # Raises if the database has already rolled the whole transaction back: the batch
            # then fails.
            await conn.execute("ROLLBACK TO job")
            await conn.execute("RELEASE job")
            if self._backend.is_failure(exc):
                log.warning("store write failed: %s: %s", type(exc).__name__, exc)
            return [(done, None, self._error(exc)) for done in waiters]
        await conn.execute("RELEASE job")
        return [(done, result, None) for done, result in zip(waiters, results, strict=True)]

    def _error(self, exc: Exception) -> Exception:
        """What a waiter is told: its domain error as raised, database trouble as 503."""
        if self._backend.is_failure(exc):
            return unavailable(self._backend, exc)
        return exc

    # -- reads --------------------------------------------------------------------------------

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """One statement outside the writer's transactions: a snapshot of committed data, taken
        at once."""
        try:
            return await self._backend.read(sql, params)
        except Exception as exc:
            if not self._backend.is_failure(exc):
                raise
            # The driver's message holds no secrets; it goes to the log, not to the caller.
            log.warning("store operation failed: %s: %s", type(exc).__name__, exc)
            raise unavailable(self._backend, exc) from exc
