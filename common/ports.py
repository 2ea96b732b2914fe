"""Free loopback ports for the processes this machine starts itself (the demo, tests, benchmarks).

A port that the kernel handed out with ``bind(0)`` lies in its ephemeral range, where any outgoing
connection may take it again before the intended server binds it. Ports are therefore chosen below
that range, and each is checked free by binding it. A gateway serves receipts on the port after
its ingress unless told otherwise, so the port after each chosen one is free and not chosen too.
A port handed out lately is not handed out again by the same process: it is free until its
server binds it, which may take a while. Where the range below the ephemeral one is too small,
the kernel chooses, without those checks.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20_000
# The ports (each with the one after it) this process handed out lately, oldest first.
_RECENT = 2048
_recent: deque[int] = deque()
_recent_set: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports on ``host`` that were free when checked."""
    high = _ephemeral_low()
    if high - _LOWEST < 100 * count:
        return _kernel_ports(count, host)
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(chosen) < count:
            port = random.randrange(_LOWEST, high - 1)
            if {port, port + 1} & _recent_set:
                continue
            probes = _bound(host, (port, port + 1))
            if probes:
                held.extend(probes)
                chosen.append(port)
                _remember(port)
    finally:
        for probe in held:
            probe.close()
    return chosen


def _remember(port: int) -> None:
    for taken in (port, port + 1):
        if len(_recent) == _RECENT:
            _recent_set.discard(_recent.popleft())
        _recent.append(taken)
        _recent_set.add(taken)


def _bound(host: str, ports: tuple[int, ...]) -> list[socket.socket]:
    """Sockets bound to every one of ``ports``, or none if one of them is taken."""
    probes: list[socket.socket] = []
    for port in ports:
        probe = socket.socket()
        try:
            probe.bind((host, port))
        except OSError:
            probe.close()
            for other in probes:
                other.close()
            return []
        probes.append(probe)
    return probes


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _kernel_ports(count: int, host: str) -> list[int]:
    held = [socket.socket() for _ in range(count)]
    try:
        for probe in held:
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in held]
    finally:
        for probe in held:
            probe.close()
