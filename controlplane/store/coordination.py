"""What control-plane replicas on one PostgreSQL database share beside the store: who leads
(runs the duties that must run once), and the rate-limit counters.

**Leadership** is a session-level advisory lock (``pg_try_advisory_lock``) held on a connection
of its own: whoever holds it leads; the others try again every few seconds. The server releases
the lock with the connection, so a leader that dies (even by SIGKILL: the server sees its socket
close) makes room at once; one whose host vanishes without closing its TCP connection is noticed
by the TCP keepalives this connection asks the server for (``_KEEPALIVES``: about 25 s). A leader
checks the connection every second (``held``): once it is lost, so is the lock, and it stops
leading, so two replicas lead at the same time for at most about that second.

**Rate counters** are sliding-window counters: one row per limit, key and fixed window, bumped by
one atomic upsert per hit, which also returns the previous window's count; the hit is allowed if
the previous window's count, weighted by how much of it still lies within one period, plus the
current one's stays within the limit (the approximation ``limits`` calls a sliding window
counter). A refused hit counts too, so a client that keeps hammering stays refused. The counters
go through a small pool of their own with ``synchronous_commit`` off: a hit must be shared, not
durable (a server crash forgets at most the last few hits), and it must not wait for the store's
group commit. The leader deletes windows that can no longer be read (``expire``).

**Session changes** are announced with ``NOTIFY`` on one channel (``SESSIONS_CHANNEL``): each
replica listens on a connection of its own and reconciles its state service at once when another
replica announces a change, so a session opened, moved or revoked through one replica reaches the
gateways that follow another within milliseconds rather than at its next reconcile.

``limits`` has no PostgreSQL storage, and Redis would be one more service to run and secure for
what one statement per hit does on the database the replicas need anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Final

import asyncpg
from limits import RateLimitItem

from controlplane.errors import ConfigurationError, Unavailable
from controlplane.store.base import redacted
from controlplane.store.postgresql import lock_key

LEADER_LOCK: Final = "controlplane leader"
SESSIONS_CHANNEL: Final = "dsn_sessions"
_RELISTEN_S: Final = 2.0
_APPLICATION = {"application_name": "dsn-controlplane"}
_KEEPALIVES: Final = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                      "tcp_keepalives_count": "3"}
# InternalClientError: what asyncpg may raise on a connection the server has just ended.
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
             TimeoutError)
_CONNECT_TIMEOUT_S: Final = 10.0

log = logging.getLogger("dsn.controlplane.replicas")

_HIT: Final = """
INSERT INTO rate_counters AS c (name, window_start, hits, expires_at) VALUES ($1, $2, 1, $3)
ON CONFLICT (name, window_start) DO UPDATE SET hits = c.hits + 1
RETURNING hits, (SELECT p.hits FROM rate_counters p
                 WHERE p.name = $1 AND p.window_start = $2 - $4) AS previous"""


class PostgresLeaderLock:
    """The leader lock on ``url``'s database (``controlplane.leader.LeaderLock``)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: asyncpg.Connection | None = None

    async def acquire(self) -> bool:
        """Try once to take the lock, connecting first; False if another process holds it or the
        database cannot be reached now."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self._url, timeout=_CONNECT_TIMEOUT_S,
                    server_settings={**_APPLICATION, **_KEEPALIVES})
            return bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1)",
                                                  lock_key(LEADER_LOCK)))
        except _FAILURES:
            await self.release()
            return False

    async def held(self) -> bool:
        """Whether the lock is still held: its connection still answers."""
        if self._conn is None or self._conn.is_closed():
            return False
        try:
            await self._conn.fetchval("SELECT 1", timeout=_CONNECT_TIMEOUT_S)
        except _FAILURES:
            await self.release()
            return False
        return True

    async def release(self) -> None:
        """Give the lock up, by closing its connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # never waits: the server frees the lock with the session


class PostgresCounters:
    """Rate-limit counters in ``url``'s database (``controlplane.ratelimit.Counters``)."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock

    @classmethod
    async def open(cls, url: str, *, clock: Callable[[], float] = time.time) -> PostgresCounters:
        """Counters on ``url``'s database, their windows placed by ``clock`` (wall-clock time,
        the same on every replica's host)."""
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=2, timeout=_CONNECT_TIMEOUT_S,
                server_settings={**_APPLICATION, "synchronous_commit": "off"})
        except _FAILURES as exc:
            raise ConfigurationError(f"rate counters: cannot connect to the database at "
                                     f"{redacted(url)}: {exc or type(exc).__name__}") from None
        return cls(pool, clock)

    async def hit(self, item: RateLimitItem, namespace: str, key: str) -> float | None:
        """Count one hit; None if it is within ``item``, else the seconds until the current
        window ends."""
        period = item.get_expiry()
        now = self._clock()
        start = math.floor(now / period) * period
        try:
            row = await self._pool.fetchrow(_HIT, item.key_for(namespace, key), start,
                                            float(start + 2 * period), period)
        except _FAILURES as exc:
            raise Unavailable("rate limit counters unavailable") from exc
        elapsed = (now - start) / period
        weighted = (row["previous"] or 0) * (1 - elapsed) + row["hits"]
        return None if weighted <= item.amount else start + period - now

    async def expire(self) -> int:
        """Delete the windows no hit reads any more; returns how many."""
        try:
            status = await self._pool.execute("DELETE FROM rate_counters WHERE expires_at < $1",
                                              self._clock())
        except _FAILURES as exc:
            raise Unavailable("rate limit counters unavailable") from exc
        return int(status.rsplit(" ", 1)[-1])

    async def aclose(self) -> None:
        await self._pool.close()


class PostgresReplicaSignal:
    """Session changes told between replicas on ``url``'s database
    (``controlplane.state.ReplicaSignal``): ``NOTIFY`` from one connection, ``LISTEN`` on
    another; a notice this process sent itself is ignored."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._notifier: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._url, timeout=_CONNECT_TIMEOUT_S,
                                     server_settings={**_APPLICATION, **_KEEPALIVES})

    async def notify(self) -> None:
        async with self._lock:
            try:
                if self._notifier is None or self._notifier.is_closed():
                    self._notifier = await self._connect()
                await self._notifier.execute(f"NOTIFY {SESSIONS_CHANNEL}")
            except _FAILURES:
                await self.aclose()
                raise

    async def listen(self, changed: Callable[[], None]) -> None:
        while True:
            try:
                await self._listen_once(changed)
            except _FAILURES as exc:
                log.warning("not listening for the other replicas' session changes (trying again "
                            "in %g s; reconcile catches up meanwhile): %s", _RELISTEN_S,
                            exc or type(exc).__name__)
            await asyncio.sleep(_RELISTEN_S)

    async def _listen_once(self, changed: Callable[[], None]) -> None:
        conn = await self._connect()
        try:
            def notice(_conn: object, pid: int, _channel: str, _payload: object) -> None:
                notifier = self._notifier
                if notifier is None or notifier.is_closed() or pid != notifier.get_server_pid():
                    changed()

            await conn.add_listener(SESSIONS_CHANNEL, notice)
            changed()  # whatever was announced while nobody listened
            while not conn.is_closed():
                await asyncio.sleep(1.0)
        finally:
            conn.terminate()

    async def aclose(self) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.terminate()
