"""REST rate limits per token, per project, and per client address for requests that fail
authentication: the ``limits`` library's async moving-window limiter over in-process memory, with
the limits read from the active policy set on every call (a policy reload applies at once).

Each limiter process counts on its own; several control-plane replicas would need a shared storage
(``limits`` offers Redis), which this class would take as an argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from controlplane.errors import RateLimited
from controlplane.policy import PolicyHolder


class RateLimiter:
    def __init__(self, policies: PolicyHolder) -> None:
        self._policies = policies
        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)

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
            if not await self._limiter.hit(item, namespace, key):
                raise RateLimited(f"rate limit of {item} exceeded for {who}",
                                      retry_after_s=await self._retry_after(item, namespace, key))

    async def _retry_after(self, item: RateLimitItem, namespace: str, key: str) -> int:
        stats = await self._limiter.get_window_stats(item, namespace, key)
        # ``limits`` reads wall-clock time itself, so the wait is computed against the same clock.
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def aclose(self) -> None:
        """Waits out the storage's background expiry task, for a clean shutdown."""
        timer = self._storage.timer
        if timer is not None and not timer.done():
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
