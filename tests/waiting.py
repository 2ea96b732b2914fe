"""The one way tests wait for something to happen: poll a check until it holds, or fail saying what
was awaited and what was last seen. A fixed sleep waits too long on a quiet machine and not long
enough on a busy one; a poll with a deadline does neither, and its failure explains itself."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, overload

T = TypeVar("T")

INTERVAL_S = 0.02
_SHOWN = 1000  # characters kept from each end of a long last value: enough to read, not a log dump


def eventually(check: Callable[[], T | None], *, timeout_s: float, what: str,
               interval_s: float = INTERVAL_S) -> T:
    """Call ``check`` until it returns a truthy value and return that value. An exception from
    ``check`` counts as "not yet" (a server still starting refuses connections), so a check may
    also assert, and its message is then the one a timeout shows. After ``timeout_s`` raise
    AssertionError naming ``what`` and the last value or exception seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value, error = _attempt(check)
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout_s, value, error) from error
        time.sleep(min(interval_s, left))


@overload
async def eventually_async(check: Callable[[], Awaitable[T | None]], *, timeout_s: float,
                           what: str, interval_s: float = INTERVAL_S) -> T: ...


@overload
async def eventually_async(check: Callable[[], T | None], *, timeout_s: float, what: str,
                           interval_s: float = INTERVAL_S) -> T: ...


async def eventually_async(check: Callable[[], Any], *, timeout_s: float, what: str,
                           interval_s: float = INTERVAL_S) -> Any:
    """``eventually`` for asyncio tests: ``check`` may be a plain function or return an awaitable
    (a coroutine function, a lambda calling one), and the loop keeps running between attempts."""
    deadline = time.monotonic() + timeout_s
    while True:
        value: Any = None
        error: Exception | None = None
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:  # noqa: BLE001 - any failure of the check means "not yet"
            value, error = None, exc
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout_s, value, error) from error
        await asyncio.sleep(min(interval_s, left))


# /proc/net/tcp states that outlive a closed connection: TIME_WAIT on the end that closed first,
# CLOSE, and SYN_SENT for a ZeroMQ peer already trying to reconnect to the closed port.
_AFTER_CLOSE = {"06", "07", "02"}


def tcp_port_closed(port: int) -> bool:
    """Whether both ends of every IPv4 TCP connection on ``port`` (and any listener on it) are
    closed: a peer process has then seen the connection go, where its own counters do not show it.
    A reset connection is gone at once, which suits: a reset socket takes no more data either."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
        if port in ports and state not in _AFTER_CLOSE:
            return False
    return True


def _attempt(check: Callable[[], T | None]) -> tuple[T | None, Exception | None]:
    try:
        return check(), None
    except Exception as exc:  # noqa: BLE001 - any failure of the check means "not yet"
        return None, exc


def _timed_out(what: str, timeout_s: float, value: object,
               error: Exception | None) -> AssertionError:
    last = f"raised {error!r}" if error is not None else f"returned {value!r}"
    if len(last) > 2 * _SHOWN:
        last = f"{last[:_SHOWN]} … {last[-_SHOWN:]}"
    return AssertionError(f"timed out after {timeout_s} s waiting for {what}; last check {last}")
