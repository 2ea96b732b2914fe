"""Leadership among control-plane replicas: the duties that must run once, whatever the number of
replicas, run in the one that holds the leader lock.

With SQLite one process serves and always leads (``SoleLock``). With PostgreSQL the lock is the
database's (``controlplane.store.coordination.PostgresLeaderLock``): every replica tries to take it
when it starts and, while another holds it, again every ``RETRY_S``; a leader whose lock is gone
(its connection lost) stops leading at its next tick and tries again like the others.

What the leader does: ``on_elected`` once each time it becomes leader (adopting the jobs of the
replicas that were serving before it), then each ``Duty`` every ``interval_s`` (audit checkpoints,
expiring rate counters, moving the sessions of silent gateways), and ``on_exit`` once when it stops
while still leading (a last checkpoint). A duty that fails is logged and runs again at its next
interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Gauge

from controlplane.errors import ControlPlaneError

log = logging.getLogger("dsn.controlplane.leader")

RETRY_S = 2.0  # how often a replica that does not lead tries to take the lock
# How often the leader checks that it still holds the lock and runs what is due (more often if a
# duty's interval is shorter).
TICK_S = 1.0

Action = Callable[[], Awaitable[object]]  # what it returns is not used


class LeaderLock(Protocol):
    async def acquire(self) -> bool:
        """Try once to take the lock; True if this process holds it now."""

    async def held(self) -> bool:
        """Whether this process still holds the lock it took."""

    async def release(self) -> None: ...


class SoleLock:
    """The lock of a control plane that no other process shares a database with: always held."""

    async def acquire(self) -> bool:
        return True

    async def held(self) -> bool:
        return True

    async def release(self) -> None:
        return None


@dataclass(frozen=True)
class Duty:
    name: str
    interval_s: float
    run: Action


@dataclass
class Leadership:
    """One replica's part: whether it leads (``leading``, also the ``gauge``), and what it runs
    while it does."""

    lock: LeaderLock
    on_elected: Action
    duties: Sequence[Duty]
    on_exit: Action
    gauge: Gauge
    leading: bool = False
    _due: dict[str, float] = field(default_factory=dict, init=False)

    async def elect(self) -> None:
        """Take the lock if it is free; once taken, run ``on_elected`` and start every duty's
        interval afresh."""
        if not await self.lock.acquire():
            return
        self._set_leading(True)
        log.info("this replica leads: it runs the run-once duties")
        await self._attempt("taking over", self.on_elected)
        now = asyncio.get_running_loop().time()
        self._due = {duty.name: now + duty.interval_s for duty in self.duties}

    async def run(self) -> None:
        """Lead while the lock holds, try to take it while it does not; until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.leading:
                await asyncio.sleep(RETRY_S)
                await self.elect()
                continue
            if not await self.lock.held():
                self._set_leading(False)
                log.warning("this replica lost the leader lock: it stops running the run-once "
                            "duties and tries to take the lock again")
                continue
            for duty in self.duties:
                if loop.time() >= self._due[duty.name]:
                    await self._attempt(duty.name, duty.run)
                    self._due[duty.name] = loop.time() + duty.interval_s
            await asyncio.sleep(min([TICK_S, *(duty.interval_s for duty in self.duties)]))

    async def stop(self) -> None:
        """Run ``on_exit`` if leading, then give the lock up."""
        try:
            if self.leading and await self.lock.held():
                await self._attempt("stopping", self.on_exit)
        finally:
            self._set_leading(False)
            await self.lock.release()

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        self.gauge.set(int(leading))

    @staticmethod
    async def _attempt(what: str, action: Action) -> None:
        try:
            await action()
        except (ControlPlaneError, OSError) as exc:
            log.error("leader duty %s failed (tried again later): %s", what, exc)
        except Exception:  # noqa: BLE001 - a duty's bug must not stop the duties while the lock holds
            log.exception("leader duty %s failed (tried again later)", what)


@contextlib.asynccontextmanager
async def leading(leadership: Leadership) -> AsyncIterator[Leadership]:
    """Try for the lead at once (so that a sole process has adopted its jobs before it serves),
    then keep leading or trying in the background until the context ends."""
    await leadership.elect()
    task = asyncio.create_task(leadership.run(), name="leadership")
    try:
        yield leadership
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await leadership.stop()
