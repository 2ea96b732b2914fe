"""REST rate limits per token, per project, and per client address for requests that fail
authentication, with the limits read from the active policy set on every call (a policy reload
applies at once).

Where the hits are counted is a ``Counters``: in this process's memory (``MemoryCounters``, the
``limits`` library's moving window), the default with SQLite, where one process serves; or in the
shared PostgreSQL database (``controlplane.store.coordination.PostgresCounters``, sliding-window
counters), so that replicas on one database count every request once, whichever serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from typing import Protocol

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from controlplane.errors import RateLimited
from controlplane.policy import PolicyHolder


class Counters(Protocol):
    async def hit(self, item: RateLimitItem, namespace: str, key: str) -> float | None:
        """Count one hit of ``key`` against ``item``; None if it is within the limit, else the
        seconds until a retry may be allowed."""

    async def expire(self) -> int:
        """Forget the windows no hit reads any more; returns how many."""

    async def aclose(self) -> None: ...


class MemoryCounters:
    """This process's own counts: ``limits``' moving window in memory."""

    def __init__(self) -> None:
        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def hit(self, item: RateLimitItem, namespace: str, key: str) -> float | None:
        if await self._limiter.hit(item, namespace, key):
            return None
        stats = await self._limiter.get_window_stats(item, namespace, key)
        # ``limits`` reads wall-clock time itself, so the wait is computed against the same clock.
        return stats.reset_time - time.time()

    async def expire(self) -> int:
        return 0  # the memory storage expires its entries itself

    async def aclose(self) -> None:
        """Waits out the storage's background expiry task, for a clean shutdown."""
        timer = self._storage.timer
        if timer is not None and not timer.done():
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer


class RateLimiter:
    def __init__(self, policies: PolicyHolder, counters: Counters | None = None) -> None:
        self._policies = policies
        self.counters = counters or MemoryCounters()

    async def check(self, token_jti: str, project: str | None) -> None:
        """Counts one request against the token's and its project's limits; RateLimited (with
        Retry-After) when either is spent. A refused request does not count against the project."""
        current = self._policies.current
        await self._hit(current.per_token_limits, "token", token_jti, "this token")
        if project is not None:
            await self._hit(current.per_project_limits, "project", project,
                            f"project {project!r}")

    async def check_unauthenticated(self, source: str) -> None:
        """Counts one request from ``source`` that failed authentication; RateLimited once the
        source has spent its allowance (a flood of forged tokens is answered 429, cheaply)."""
        await self._hit(self._policies.current.unauthenticated_limits, "source", source,
                        f"requests without a valid token from {source}")

    async def _hit(self, items: Sequence[RateLimitItem], namespace: str, key: str,
                   who: str) -> None:
        for item in items:
            wait = await self.counters.hit(item, namespace, key)
            if wait is not None:
                raise RateLimited(f"rate limit of {item} exceeded for {who}",
                                  retry_after_s=max(1, math.ceil(wait)))

    async def aclose(self) -> None:
        await self.counters.aclose()
