"""A connection flood against a running gateway while a registered producer streams a scan.

Hundreds of junk connections (raw TCP garbage, half ZMTP greetings, NULL and PLAIN ZeroMQ clients,
CURVE clients with unregistered keys) are opened between the real producer's messages. The real
scan must arrive complete and in order, every junk connection must be refused before it can send
a message, the refusals the gateway can observe must be counted by reason, and the gateway must
admit and serve a new producer afterwards. One refusal of each kind on its own is proven by
``test_gateway_proxy.py::test_refused_connections_are_counted_and_deliver_nothing``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from itertools import cycle

import pytest
import test_gateway_proxy
import zmq
from test_gateway_proxy import Rig, begin, data, end, receive
from waiting import eventually

from common.keys import KeyPair
from common.protocol import RoutedScanEnd, decode_consumer_message

rig = test_gateway_proxy.rig  # the gateway rig fixture, shared

JUNK_KINDS = ("garbage", "half_greeting", "NULL", "PLAIN", "CURVE")
JUNK = 300
SCAN_SHAPE = (10, 10)
SECTORS = 2  # the rig's small detector
# The ZMTP 3 greeting's signature and major version, then nothing: a client that stalls mid-way.
HALF_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03"
# What a port scanner sends. Fixed, not random: bytes that happened to start like a ZMTP signature
# would reach the handshake and be counted, making the expected counts below a matter of luck.
GARBAGE = b"GET / HTTP/1.1\r\nHost: dsn\r\n\r\n" + bytes(range(256))


def _raw(address: tuple[str, int], payload: bytes) -> None:
    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(payload)


def _zmq_client(r: Rig, kind: str, keypair: Callable[[], KeyPair]) -> None:
    client = r.context.socket(zmq.PUSH)
    client.linger = 0
    client.reconnect_ivl = -1  # one attempt each, so the refusals can be counted exactly
    if kind == "PLAIN":
        client.plain_username, client.plain_password = b"user", b"password"
    elif kind == "CURVE":
        stranger = keypair()
        client.curve_publickey, client.curve_secretkey = stranger.public, stranger.secret
        client.curve_serverkey = r.server.public
    client.connect(r.ingress)
    r.producers.append(client)  # closed by the rig fixture


def _open_junk(r: Rig, kind: str, keypair: Callable[[], KeyPair]) -> None:
    host, port = r.ingress.removeprefix("tcp://").rsplit(":", 1)
    if kind == "garbage":
        _raw((host, int(port)), GARBAGE)
    elif kind == "half_greeting":
        _raw((host, int(port)), HALF_GREETING)
    else:
        _zmq_client(r, kind, keypair)


def _scan_messages(scan: int) -> Iterator[list[bytes]]:
    rows, cols = SCAN_SHAPE
    yield begin(scan=scan, shape=SCAN_SHAPE)
    for seq in range(rows * cols * SECTORS):
        yield data(scan, seq // SECTORS, seq % SECTORS, seq=seq)
    yield end(scan=scan, sent=rows * cols * SECTORS)


def _handshake_refusals(r: Rig) -> int:
    return sum(n for (decision, reason), n in r.gateway.auth_decisions().items()
               if decision == "deny" and reason.startswith("handshake"))


@pytest.mark.timeout(30)
def test_a_junk_connection_flood_neither_blocks_nor_corrupts_a_real_stream(
        rig: Callable[..., Rig], curve_keypair: Callable[[], KeyPair]) -> None:
    r = rig(consumers=1)
    consumer, producer = r.consumers[0], r.producer()
    messages = list(_scan_messages(scan=1))
    kinds = cycle(JUNK_KINDS)
    # Interleave by construction rather than by timing: junk before every real message.
    per_message = JUNK // len(messages) + 1
    opened = 0
    for message in messages:
        for _ in range(min(per_message, JUNK - opened)):
            _open_junk(r, next(kinds), curve_keypair)
            opened += 1
        producer.send_multipart(message)
    assert opened == JUNK

    received = receive(consumer, len(messages), timeout_ms=15_000)
    assert received[1:-1] == messages[1:-1]  # every sector, in order, byte for byte
    routed_end = decode_consumer_message(received[-1][0])
    assert isinstance(routed_end, RoutedScanEnd)
    data_messages = len(messages) - 2
    assert (routed_end.expected, routed_end.accepted, routed_end.dropped) == (
        data_messages, data_messages, {})

    each = JUNK // len(JUNK_KINDS)
    # ZAP sees every CURVE stranger; libzmq reports every NULL, PLAIN and half-greeting client to
    # the handshake monitor. Raw garbage is closed by libzmq without a handshake event; it shows
    # among the accepted connections, with every other one.
    eventually(lambda: r.gateway.connections().get("accepted", 0) >= JUNK + 1, timeout_s=10,
               what="every connection accepted and counted")
    eventually(lambda: r.gateway.auth_decisions().get(("deny", "unknown_key"), 0) >= each,
               timeout_s=10, what="every unregistered CURVE key refused by ZAP")
    eventually(lambda: _handshake_refusals(r) >= 3 * each, timeout_s=10,
               what="every failed handshake counted")
    decisions = r.gateway.auth_decisions()
    assert decisions[("deny", "unknown_key")] == each
    assert _handshake_refusals(r) == 3 * each
    assert decisions[("allow", "session")] == 1, "only the real producer was admitted"
    assert r.gateway.router is not None and r.gateway.router.drops == {}

    # Still serving: a new connection with the registered key is admitted and its scan routed.
    again = list(_scan_messages(scan=2))
    fresh = r.producer()
    for message in again:
        fresh.send_multipart(message)
    assert receive(consumer, len(again))[1:-1] == again[1:-1]
    assert r.gateway.auth_decisions()[("allow", "session")] == 2
