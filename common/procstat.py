"""CPU time of a process's threads by their kernel names, from /proc (Linux), and naming the calling
thread so that it shows there, and in ``top -H``, ``ps -L`` and ``perf``, under its own name."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

PR_SET_NAME: Final = 15
NAME_BYTES: Final = 15  # the kernel keeps 16 bytes, the last a NUL


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` (its first 15 bytes) in the kernel; nothing elsewhere."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:NAME_BYTES], 0, 0, 0)


def named_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread (not started) called ``name`` in Python and in the kernel, so that each of
    a process's threads is told apart in ``top -H`` and by ``thread_cpu_seconds``."""
    def run() -> None:
        name_this_thread(name)
        target()
    return threading.Thread(target=run, name=name, daemon=True)


def thread_cpu_seconds(pid: int | None = None) -> dict[str, float]:
    """CPU seconds each thread of process ``pid`` (this one when None) has run so far, summed by
    thread name, to the nanosecond (``schedstat``); empty where /proc does not show them."""
    root = Path("/proc/self/task" if pid is None else f"/proc/{pid}/task")
    totals: dict[str, float] = {}
    try:
        tasks = list(root.iterdir())
    except OSError:
        return totals
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            nanoseconds = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
        totals[name] = totals.get(name, 0.0) + nanoseconds / 1e9
    return totals
