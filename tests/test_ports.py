"""Free loopback ports for the processes the tests, the demo and the benchmarks start."""

from __future__ import annotations

import random
import socket

import pytest

from common import ports
from common.ports import free_ports


def test_free_ports_are_distinct_below_the_ephemeral_range_and_leave_the_next_port_free() -> None:
    ports = free_ports(50)
    assert len(set(ports)) == 50
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_low = int(ranges.read().split()[0])
    assert all(20_000 <= port < ephemeral_low - 1 for port in ports)
    # A gateway's receipts default to the port after its ingress: never another chosen port.
    assert not {port + 1 for port in ports} & set(ports)
    probes = []
    try:
        for port in ports:
            for candidate in (port, port + 1):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", candidate))  # raises if it was not free
    finally:
        for probe in probes:
            probe.close()


def test_a_port_handed_out_lately_is_not_handed_out_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Free until its server binds it: a second caller would get the same port."""
    [base] = free_ports(1)
    draws = iter([base, base + 1, base - 1])
    real = random.randrange
    monkeypatch.setattr(ports.random, "randrange",
                        lambda low, high: next(draws, None) or real(low, high))
    assert not {base - 1, base, base + 1} & set(free_ports(1))


def test_a_port_next_to_a_chosen_one_is_not_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    [base] = free_ports(1)  # free with the port after it, a moment ago
    monkeypatch.setattr(ports, "_recent_set", set())  # forgotten: it may be chosen again
    draws = iter([base, base + 1, base - 1])
    real = random.randrange
    monkeypatch.setattr(ports.random, "randrange",
                        lambda low, high: next(draws, None) or real(low, high))
    chosen = free_ports(2)
    assert chosen[0] == base and base + 1 not in chosen and base - 1 not in chosen
