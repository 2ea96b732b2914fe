"""What the engine, its two database backends and the repositories share: the shape of a
connection as a transaction body sees it, of a row, and of a backend.

A transaction body (a repository's write) is given a ``Conn``: ``execute`` (awaited for its cursor,
or used as ``async with``), ``executemany`` and ``lock``. A row is read by column name or position,
as ``sqlite3.Row`` and ``asyncpg.Record`` both are. Repositories write their SQL once, in SQLite's
dialect (``controlplane.store.dialect`` says what the PostgreSQL backend translates).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from controlplane.errors import Unavailable

T = TypeVar("T")

DATABASE_URL_SCHEMES = ("postgresql", "postgres")  # as libpq and asyncpg accept them

# The ``Conn.lock`` every quota check takes before counting (live tokens, open sessions, live
# consumers), so that processes sharing the database cannot both pass a check and exceed the quota.
# One name for all of them: a group-committed batch holds its locks to its commit, so with a lock
# per project two processes' batches could take two in opposite orders and deadlock; with one, a
# batch takes at most this and then the audit chain's (its appends run last), always in that order.
QUOTA_LOCK = "quota checks"


class Row(Protocol):
    def __getitem__(self, key: Any, /) -> Any: ...

    def keys(self) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    async def fetchone(self) -> Any: ...  # a Row, or None

    async def fetchall(self) -> Iterable[Any]: ...  # Rows


class Execution(Protocol):
    """A statement sent: await it for its cursor, or ``async with`` it."""

    def __await__(self) -> Generator[Any, None, Cursor]: ...

    async def __aenter__(self) -> Cursor: ...

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any, /) -> Any: ...


class Conn(Protocol):
    """The write transaction, as a body run by ``Store.write`` sees it."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Execution: ...

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    async def lock(self, name: str) -> None:
        """Hold, until the transaction ends, a lock that serialises the transactions of every
        process sharing the database that take the same ``name``."""


class Backend(Protocol):
    """One database: its write transactions (run by the engine's writer task alone), its reads,
    and which of the exceptions its driver raises are its own trouble (503) rather than a
    caller's domain error."""

    busy_timeout_s: float

    async def transaction(self, body: Callable[[Conn], Awaitable[T]]) -> T: ...

    async def read(self, sql: str, params: Sequence[Any]) -> list[Row]: ...

    def is_failure(self, exc: BaseException) -> bool: ...

    def is_busy(self, exc: BaseException) -> bool:
        """A lock held elsewhere outlasted the busy timeout: worth retrying shortly."""

    async def close(self) -> None: ...


def unavailable(backend: Backend, exc: BaseException) -> Unavailable:
    if backend.is_busy(exc):
        return Unavailable("store is busy (locked by another writer); retry shortly",
                           retry_after_s=max(1, round(backend.busy_timeout_s)))
    return Unavailable("store unavailable")


# SQLite may hand a whole-number REAL back as an int (RETURNING does); times are always floats,
# which matters to the audit hash, where 1 and 1.0 serialise differently.
def time_or_none(value: float | None) -> float | None:
    """A nullable time column as a float (or None), whatever type the driver handed back."""
    return None if value is None else float(value)


def redacted(url: str) -> str:
    """``url`` with its password, if any (in the user part or as a ``password`` parameter),
    replaced: what may be logged or shown."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = urlencode([(key, "***" if key == "password" else value)
                       for key, value in parse_qsl(parts.query, keep_blank_values=True)],
                      safe="/*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
