"""A connection flood against a running gateway while a registered producer streams a scan.

Hundreds of junk connections (raw TCP garbage, half ZMTP greetings, NULL and PLAIN ZeroMQ clients,
CURVE clients with unregistered keys) are opened between the real producer's messages. The real
scan must arrive complete and in order, every junk connection must be refused before it can send
a message, the refusals the gateway can observe must be counted by reason, and the gateway must
admit and serve a new producer afterwards. One refusal of each kind on its own is proven by
``test_gateway_proxy.py::test_refused_connections_are_counted_and_deliver_nothing``. Refusals
made before ZAP is asked are logged with their reason, a flood of them in a few lines.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from itertools import cycle

import pytest
import test_gateway_proxy
import zmq
from test_gateway_proxy import Rig, begin, data, end, receive
from waiting import eventually

from common.keys import KeyPair
from common.logs import JsonLines
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


class Records(logging.Handler):
    """Every record of one logger, kept."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def refusals(self) -> list[dict[str, object]]:
        """The handshake refusals' fields (ZAP's refusals have a peer, these an endpoint)."""
        refused = [dict(vars(r)["fields"]) for r in self.records
                   if r.getMessage() == "connection refused"]
        return [fields for fields in refused if str(fields["reason"]).startswith("handshake")]


@pytest.fixture
def auth_log() -> Iterator[Records]:
    """The records of ``dsn.gateway.auth``, captured at its own logger whatever the root does."""
    logger = logging.getLogger("dsn.gateway.auth")
    records, level = Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


def _handshake_failures(r: Rig) -> dict[str, int]:
    return {reason: n for (decision, reason), n in r.gateway.auth_decisions().items()
            if decision == "deny" and reason.startswith("handshake")}


def _wrong_server_key(r: Rig, keypair: Callable[[], KeyPair]) -> None:
    """A client holding the session's own key but another server's key: libzmq refuses it."""
    client = r.context.socket(zmq.PUSH)
    client.linger = 0
    client.reconnect_ivl = -1
    client.curve_publickey, client.curve_secretkey = r.client.public, r.client.secret
    client.curve_serverkey = keypair().public
    client.connect(r.ingress)
    r.producers.append(client)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["NULL", "PLAIN", "wrong server key"])
def test_a_connection_refused_before_zap_is_logged_with_its_reason_and_no_key(
        rig: Callable[..., Rig], curve_keypair: Callable[[], KeyPair], auth_log: Records,
        kind: str) -> None:
    r = rig(consumers=1)
    if kind == "wrong server key":
        _wrong_server_key(r, curve_keypair)
    else:
        _zmq_client(r, kind, curve_keypair)
    [refusal] = eventually(auth_log.refusals, timeout_s=10, what="a logged handshake refusal")
    reason = refusal.pop("reason")
    assert _handshake_failures(r) == {reason: 1}
    # libzmq's monitor events name the ingress that refused, not the peer (docs/observability.md).
    assert refusal == {"endpoint": r.ingress, "count": 1}
    lines = "\n".join(JsonLines({}).format(record) for record in auth_log.records)
    for key in (r.client.public, r.client.secret, r.server.public, r.server.secret):
        assert key.decode() not in lines


@pytest.mark.timeout(30)
def test_a_flood_of_refused_handshakes_is_logged_at_powers_of_two_with_the_running_count(
        rig: Callable[..., Rig], curve_keypair: Callable[[], KeyPair], auth_log: Records) -> None:
    r = rig(consumers=1)
    flood = 40
    for _ in range(flood):
        _zmq_client(r, "NULL", curve_keypair)
    eventually(lambda: sum(_handshake_failures(r).values()) == flood, timeout_s=15,
               what="every NULL client refused")

    def logged() -> dict[str, list[object]]:
        # Per reason: the 1st, 2nd, 4th, 8th... refusal, each line with the count so far.
        by_reason = {reason: [2 ** k for k in range(n.bit_length())]
                     for reason, n in _handshake_failures(r).items()}
        seen: dict[str, list[object]] = {}
        for refusal in auth_log.refusals():
            seen.setdefault(str(refusal["reason"]), []).append(refusal["count"])
        assert seen == by_reason
        return seen

    seen = eventually(logged, timeout_s=5, what="the refusals logged at powers of two")
    assert sum(map(len, seen.values())) <= 2 * flood.bit_length()
