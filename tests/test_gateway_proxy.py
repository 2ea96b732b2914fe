"""The gateway on real sockets: L7 routing, drops, ZAP refusals, expiry, backpressure, L4."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from waiting import eventually

from common import strictyaml
from common.config import load_config
from common.keys import KeyPair
from common.procstat import thread_cpu_seconds
from common.protocol import (
    Data,
    NcemHeader,
    RoutedScanBegin,
    RoutedScanEnd,
    ScanBegin,
    ScanEnd,
    decode_consumer_message,
    encode,
    encode_ncem,
)
from gateway.errors import ModeError
from gateway.metrics import serve_metrics
from gateway.proxy import Gateway
from gateway.sessions import SessionTable

SMALL = {"frame_shape": [8, 4], "sectors": 2}
SMALL_SECTOR = 4 * 4 * 2


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    gateway: Gateway
    ingress: str
    server: KeyPair
    client: KeyPair
    consumers: list[zmq.Socket]
    context: zmq.Context
    clock: Clock
    threads: list[threading.Thread] = field(default_factory=list)
    producers: list[zmq.Socket] = field(default_factory=list)

    def producer(self, client: KeyPair | None = None, server_key: bytes | None = None,
                 mechanism: str = "CURVE", sndhwm: int = 1000) -> zmq.Socket:
        socket = self.context.socket(zmq.PUSH)
        socket.sndhwm = sndhwm
        if mechanism == "CURVE":
            client = client or self.client
            socket.curve_publickey, socket.curve_secretkey = client.public, client.secret
            socket.curve_serverkey = server_key or self.server.public
        elif mechanism == "PLAIN":
            socket.plain_username, socket.plain_password = b"user", b"password"
        socket.connect(self.ingress)
        self.producers.append(socket)
        return socket


def _sector(value: int, size: int = SMALL_SECTOR) -> bytes:
    return bytes([value % 256]) * size


def begin(scan: int = 1, shape: tuple[int, int] = (3, 4), producers: int = 1,
          frame_shape: tuple[int, int] = (8, 4), sectors: int = 2) -> list[bytes]:
    return [encode(ScanBegin(v=1, scan=scan, scan_shape=shape, frame_shape=frame_shape,
                             sectors=sectors, producers=producers, dtype="uint16"))]


def data(scan: int, frame: int, sector: int, seq: int = 0,
         size: int = SMALL_SECTOR) -> list[bytes]:
    return [encode(Data(v=1, scan=scan, frame=frame, sector=sector, seq=seq)),
            _sector(frame, size)]


def end(scan: int = 1, sent: int = 0) -> list[bytes]:
    return [encode(ScanEnd(v=1, scan=scan, sent=sent))]


def receive(socket: zmq.Socket, count: int, timeout_ms: int = 5000) -> list[list[bytes]]:
    messages = []
    deadline = time.monotonic() + timeout_ms / 1000
    while len(messages) < count:
        left = int((deadline - time.monotonic()) * 1000)
        if left <= 0 or not socket.poll(left):
            raise AssertionError(f"received {len(messages)} of {count} messages")
        messages.append(socket.recv_multipart())
    return messages


def assert_silent(socket: zmq.Socket, ms: int = 300) -> None:
    assert not socket.poll(ms), f"unexpected message {socket.recv_multipart()!r:.120}"


@pytest.fixture
def rig(tmp_path: Path, zmq_context: zmq.Context, free_port: Callable[[], int],
        server_key_files: tuple[KeyPair, Path],
        curve_keypair: Callable[[], KeyPair]) -> Iterator[Callable[..., Rig]]:
    """Start gateways on configs written here; consumers are PULL sockets bound on random ports."""
    rigs: list[Rig] = []

    def make(consumers: int = 2, mode: str = "l7", detector: dict[str, Any] | None = None,
             sessions: int = 1, rcvhwm: int = 1000, settings: dict[str, Any] | None = None,
             **session: Any) -> Rig:
        server, secret_file = server_key_files
        client = curve_keypair()
        pulls = [zmq_context.socket(zmq.PULL) for _ in range(consumers)]
        for pull in pulls:
            pull.rcvhwm = rcvhwm
        ports = [pull.bind_to_random_port("tcp://127.0.0.1") for pull in pulls]
        ingress = f"tcp://127.0.0.1:{free_port()}"
        spec = {"id": "s1", "client_keys": [client.public.decode()],
                "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
                "consumers": [f"tcp://127.0.0.1:{p}" for p in ports],
                "detector": SMALL if detector is None else detector, **session}
        extra = [{**spec, "id": f"s{i + 2}", "client_keys": [curve_keypair().public.decode()]}
                 for i in range(sessions - 1)]
        path = tmp_path / f"dsn-{len(rigs)}.yaml"
        path.write_text(strictyaml.dump({
            "version": 1, "sessions": [spec, *extra],
            "gateway": {"ingress": ingress, "server_secret_key_file": str(secret_file),
                        **(settings or {})}}))
        clock = Clock()
        gateway = Gateway(load_config(path), mode=mode, clock=clock)  # type: ignore[arg-type]
        try:
            gateway.start()
        except Exception:
            for pull in pulls:
                pull.close()
            raise
        made = Rig(gateway, ingress, server, client, pulls, zmq_context, clock)
        thread = threading.Thread(target=gateway.run, daemon=True)
        thread.start()
        made.threads.append(thread)
        rigs.append(made)
        return made

    yield make
    for made in rigs:
        made.gateway.stop()
        for thread in made.threads:
            thread.join(timeout=5)
            assert not thread.is_alive(), "gateway loop did not stop"
        made.gateway.close()
        for zmq_socket in [*made.producers, *made.consumers]:
            zmq_socket.close(linger=0)


@pytest.mark.timeout(20)
def test_each_of_the_gateway_s_threads_is_named_in_the_kernel(rig: Callable[..., Rig]) -> None:
    """So that ``top -H`` and the thread CPU metric tell them apart."""
    rig(consumers=1)
    expected = {"dsn-forward", "dsn-zap", "dsn-handshakes", "dsn-receipts"}
    eventually(lambda: expected <= set(thread_cpu_seconds()), timeout_s=5,
               what=f"threads named {sorted(expected)}")


@pytest.mark.timeout(20)
def test_l7_routes_frames_mod_n_between_routed_scan_begin_and_scan_end(
        rig: Callable[..., Rig]) -> None:
    r = rig(consumers=2)
    producer = r.producer()
    producer.send_multipart(begin(scan=3, shape=(3, 4)))
    sent = 0
    for frame in range(12):
        for sector in range(2):
            producer.send_multipart(data(3, frame, sector, seq=sent))
            sent += 1
    producer.send_multipart(end(scan=3, sent=sent))
    for index, pull in enumerate(r.consumers):
        first, *body, last = receive(pull, 1 + 12 + 1)
        assert decode_consumer_message(first[0]) == RoutedScanBegin(
            v=1, session="s1", scan=3, scan_shape=(3, 4), frame_shape=(8, 4), sectors=2,
            dtype="uint16", members=2, index=index)
        frames = [decode_consumer_message(m[0]).frame for m in body]  # type: ignore[union-attr]
        assert sorted(set(frames)) == list(range(index, 12, 2))
        assert all(m[1] == _sector(f) for m, f in zip(body, frames, strict=True))
        routed_end = decode_consumer_message(last[0])
        assert isinstance(routed_end, RoutedScanEnd)
        assert (routed_end.expected, routed_end.sent, routed_end.accepted) == (12, 24, 24)
        assert routed_end.dropped == {} and routed_end.drops == []


def test_the_gateway_runs_the_io_threads_its_configuration_names(rig: Callable[..., Rig]) -> None:
    r = rig(consumers=1)
    assert r.gateway.context.get(zmq.IO_THREADS) == r.gateway.config.gateway.io_thread_count


def _tcp_buffers(option: int, *, local_port: int | None = None,
                 peer_port: int | None = None) -> list[int]:
    """``option`` (SO_RCVBUF or SO_SNDBUF) as the kernel holds it for each connected TCP socket
    of this process (the gateway runs in it) with that local or peer port."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if not os.readlink(entry).startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(entry.name)))
        except OSError:
            continue  # closed meanwhile
        with sock:
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                continue
            try:
                local, peer = sock.getsockname()[1], sock.getpeername()[1]
            except OSError:
                continue  # a listening socket
            if local_port in (None, local) and peer_port in (None, peer):
                found.append(sock.getsockopt(socket.SOL_SOCKET, option))
    return found


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode", ["l7", "l4"])
def test_configured_socket_buffers_reach_the_kernel_on_every_connection(
        rig: Callable[..., Rig], free_port: Callable[[], int], mode: str) -> None:
    size = 256 * 1024
    settings: dict[str, Any] = {"ingress_buffer_bytes": size, "egress_buffer_bytes": size}
    plain_port = free_port()
    if mode == "l7":  # and the plaintext ingress, which only L7 has
        settings["plain_ingress"] = f"tcp://127.0.0.1:{plain_port}"
    r = rig(consumers=1, mode=mode, settings=settings)
    producer = r.producer()
    producer.send_multipart(begin(shape=(1, 1)))
    producer.send_multipart(data(1, 0, 0))
    receive(r.consumers[0], 2)  # the producer's connection is up, and the consumer's
    ingress_port = int(r.ingress.rsplit(":", 1)[1])
    consumer_port = int(r.consumers[0].last_endpoint.decode().rsplit(":", 1)[1])

    def doubled(limit: str) -> int:  # the kernel doubles what it is given, up to its cap
        return 2 * min(size, int(Path(f"/proc/sys/net/core/{limit}").read_text()))

    assert _tcp_buffers(socket.SO_RCVBUF, local_port=ingress_port) == [doubled("rmem_max")]
    assert _tcp_buffers(socket.SO_SNDBUF, peer_port=consumer_port) == [doubled("wmem_max")]
    if mode == "l7":
        with socket.create_connection(("127.0.0.1", plain_port)):
            eventually(lambda: _tcp_buffers(socket.SO_RCVBUF, local_port=plain_port),
                       timeout_s=5.0, what="the plaintext ingress accepting")
            assert _tcp_buffers(socket.SO_RCVBUF, local_port=plain_port) == [
                doubled("rmem_max")]


@pytest.mark.timeout(20)
def test_ncem_headers_are_translated_to_native_headers(rig: Callable[..., Rig]) -> None:
    r = rig(consumers=1)
    producer = r.producer()
    producer.send_multipart(begin(scan=5, shape=(3, 4)))
    ncem = NcemHeader(scan_number=5, frame_number=7, positions_per_row=4, rows=3, x_in_row=3,
                      row_in_scan=1, thread_id=2, module=1)
    producer.send_multipart([encode_ncem(ncem), _sector(7)])
    _, (header, payload) = receive(r.consumers[0], 2)
    assert decode_consumer_message(header) == Data(v=1, scan=5, frame=7, sector=1, seq=7)
    assert payload == _sector(7)


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


@pytest.mark.timeout(30)
def test_bad_traffic_is_dropped_by_reason_and_good_traffic_still_flows(
        rig: Callable[..., Rig], free_port: Callable[[], int]) -> None:
    r = rig(consumers=1)
    producer = r.producer()
    producer.send_multipart(begin(scan=1, shape=(3, 4)))
    duplicate = b"\x87" + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in [
        ("v", 1), ("type", "data"), ("scan", 1), ("frame", 0), ("sector", 0), ("seq", 0),
        ("seq", 1)])
    bad = [
        [b"\xc1", _sector(0)],                                  # malformed_header
        [b"\x81\xa4type\xa4da\xff\xfe", _sector(0)],            # malformed_header (bad UTF-8)
        [b"\x81" + b"\xa1v" + b"\x01" * 600, _sector(0)],      # oversized_header
        [duplicate, _sector(0)],                                # duplicate_key
        data(1, 0, 0) + [b"extra"],                             # wrong_part_count
        data(1, 12, 0),                                         # out_of_range
        data(1, 0, 0, size=SMALL_SECTOR - 2),                   # wrong_payload_size
        data(9, 0, 0),                                          # unknown_scan
    ]
    for message in bad:
        producer.send_multipart(message)
    producer.send_multipart(data(1, 4, 1))
    (_, (header, _payload)) = receive(r.consumers[0], 2)
    assert decode_consumer_message(header) == Data(v=1, scan=1, frame=4, sector=1, seq=0)
    router = r.gateway.router
    assert router is not None
    assert router.drops == {("s1", "malformed_header"): 2} | {("s1", reason): 1 for reason in (
        "oversized_header", "duplicate_key", "wrong_part_count",
        "out_of_range", "wrong_payload_size", "unknown_scan")}

    # A payload beyond MAXMSGSIZE never reaches the gateway: libzmq drops the connection.
    big = r.producer()
    big.send_multipart(data(1, 5, 0, size=SMALL_SECTOR + 8192))
    assert_silent(r.consumers[0])
    producer.send_multipart(data(1, 6, 0))
    assert decode_consumer_message(receive(r.consumers[0], 1)[0][0]).frame == 6  # type: ignore[union-attr]

    address = f"127.0.0.1:{free_port()}"
    server = serve_metrics(address, r.gateway)
    try:
        text = _metrics(address)
    finally:
        server.shutdown()
        server.server_close()
    assert 'dsn_gateway_drops_total{reason="duplicate_key",session="s1"} 1.0' in text
    assert 'dsn_gateway_messages_total{session="s1"} 2.0' in text
    assert f'dsn_gateway_bytes_total{{session="s1"}} {2.0 * SMALL_SECTOR}' in text
    assert 'dsn_gateway_scans_open{session="s1"} 1.0' in text
    assert 'dsn_gateway_consumers{session="s1"} 1.0' in text
    # The oversized sender's connection was dropped by libzmq; it reconnects, so >= 2 allows.
    assert 'dsn_gateway_auth_decisions_total{decision="allow",reason="session"}' in text


def _refusal_cases() -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("unregistered key", {"client": "random"}, "unknown_key"),
        # Both ends see the mechanism mismatch; which one hangs up first decides whether the
        # gateway learns the detail, so any handshake refusal counts here.
        ("NULL client", {"mechanism": "NULL"}, "handshake"),
        ("PLAIN client", {"mechanism": "PLAIN"}, "handshake"),
        ("wrong server key", {"server_key": "random"}, "handshake"),
        ("outside allowed_networks", {"networks": ["10.0.0.0/8"]}, "network"),
    ]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("case", "how", "reason"), _refusal_cases(),
                         ids=[c[0] for c in _refusal_cases()])
def test_refused_connections_are_counted_and_deliver_nothing(
        rig: Callable[..., Rig], curve_keypair: Callable[[], KeyPair], case: str,
        how: dict[str, Any], reason: str) -> None:
    r = rig(consumers=1, allowed_networks=how.get("networks", ["127.0.0.0/8"]))
    producer = r.producer(
        client=curve_keypair() if how.get("client") else None,
        server_key=curve_keypair().public if how.get("server_key") else None,
        mechanism=how.get("mechanism", "CURVE"))
    for message in (begin(), data(1, 0, 0)):
        try:
            # A refused client may have no peer left to queue for; that is the point.
            producer.send_multipart(message, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def refused() -> bool:
        return any(d == "deny" and why.startswith(reason) for d, why in r.gateway.auth_decisions())

    eventually(refused, timeout_s=5.0, what=f"deny/{reason}*")
    assert ("allow", "session") not in r.gateway.auth_decisions()
    assert_silent(r.consumers[0])
    assert r.gateway.router is not None and r.gateway.router.drops == {}


@pytest.mark.timeout(20)
def test_messages_of_an_expired_session_are_dropped(rig: Callable[..., Rig]) -> None:
    expires = time.time() + 3600
    # The clock jumps an hour: a long scan_idle_s keeps the open scan from closing as idle.
    r = rig(consumers=1, expires_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
            limits={"scan_idle_s": 86_400})
    producer = r.producer()
    producer.send_multipart(begin())
    receive(r.consumers[0], 1)
    r.clock.now = expires + 1
    producer.send_multipart(data(1, 0, 0))
    router = r.gateway.router
    assert router is not None
    eventually(lambda: router.drops.get(("s1", "session_expired"), 0) == 1, timeout_s=5.0,
               what="a session_expired drop")
    assert_silent(r.consumers[0])
    with contextlib.suppress(zmq.Again):  # refused at once, the key may never get a pipe
        r.producer(client=r.client).send_multipart(begin(scan=2), flags=zmq.NOBLOCK)
    eventually(lambda: r.gateway.auth_decisions().get(("deny", "expired"), 0) >= 1, timeout_s=5.0,
               what="deny/expired")


@pytest.mark.timeout(30)
def test_a_consumer_that_does_not_read_blocks_the_producer_and_loses_nothing(
        rig: Callable[..., Rig]) -> None:
    r = rig(consumers=1, detector={}, limits={"hwm": 2}, rcvhwm=2)
    sector = 576 // 4 * 576 * 2
    producer = r.producer(sndhwm=2)
    producer.send_multipart(begin(shape=(64, 64), frame_shape=(576, 576), sectors=4))
    sent = 0
    while True:
        try:
            producer.send_multipart(data(1, sent, 0, seq=sent, size=sector), flags=zmq.NOBLOCK)
            sent += 1
            continue
        except zmq.Again:
            if producer.poll(500, zmq.POLLOUT):
                continue
        break
    assert 0 < sent < 400, f"the producer was never blocked ({sent} messages queued)"
    # While the gateway waits for the consumer, the wait shows: counted, and growing.
    eventually(lambda: r.gateway.backpressure().get("s1", (0, 0.0, 0.0))[2] > 0.2,
               timeout_s=10, what="the ongoing wait in the backpressure metrics")
    waits_during, _, _ = r.gateway.backpressure()["s1"]
    assert waits_during >= 1
    messages = receive(r.consumers[0], 1 + sent, timeout_ms=15_000)
    frames = [decode_consumer_message(m[0]).frame for m in messages[1:]]  # type: ignore[union-attr]
    assert frames == list(range(sent))
    producer.send_multipart(end(sent=sent))
    routed_end = decode_consumer_message(receive(r.consumers[0], 1)[0][0])
    assert isinstance(routed_end, RoutedScanEnd) and routed_end.expected == sent
    assert r.gateway.router is not None and r.gateway.router.drops == {}
    waits, seconds, waiting_now = r.gateway.backpressure()["s1"]
    assert waiting_now == 0  # no send waits any more
    assert waits >= 1 and seconds > 0  # the wait shows in the metrics


@pytest.mark.timeout(20)
def test_a_new_table_without_the_session_refuses_it_at_once(rig: Callable[..., Rig]) -> None:
    r = rig(consumers=1)
    producer = r.producer()
    producer.send_multipart(begin())
    receive(r.consumers[0], 1)
    r.gateway.use_table(SessionTable())
    producer.send_multipart(data(1, 0, 0))
    router = r.gateway.router
    assert router is not None
    eventually(lambda: router.drops.get(("s1", "unauthenticated"), 0) == 1, timeout_s=5.0,
               what="an unauthenticated drop")
    with contextlib.suppress(zmq.Again):  # refused at once, the key may never get a pipe
        r.producer().send_multipart(begin(scan=2), flags=zmq.NOBLOCK)
    eventually(lambda: r.gateway.auth_decisions().get(("deny", "unknown_key"), 0) >= 1,
               timeout_s=5.0, what="deny/unknown_key")
    assert_silent(r.consumers[0])


@pytest.mark.timeout(30)
def test_what_was_forwarded_before_a_session_ended_still_reaches_its_consumer(
        rig: Callable[..., Rig]) -> None:
    # The consumer takes nothing until the session has ended: the scan, forwarded whole, waits
    # in the gateway's queue for it (more than loopback's socket buffers hold), as it does for a
    # rank still counting when its producer ends the session.
    r = rig(consumers=1, detector={}, limits={"hwm": 128}, rcvhwm=1)
    sector = 576 // 4 * 576 * 2
    count = 24
    producer = r.producer()
    producer.send_multipart(begin(shape=(64, 64), frame_shape=(576, 576), sectors=4))
    receive(r.consumers[0], 1)  # the routed scan_begin: the path is up
    for seq in range(count):
        producer.send_multipart(data(1, seq, 0, seq=seq, size=sector))
    producer.send_multipart(end(sent=count))
    router = r.gateway.router
    assert router is not None
    eventually(lambda: any(s.session == "s1" and s.messages == count and not s.open_scans
                           for s in router.stats()),
               timeout_s=10, what="the gateway to forward the whole scan and close it")
    r.gateway.use_table(SessionTable())
    eventually(lambda: not any(s.session == "s1" and s.consumers for s in router.stats()),
               timeout_s=5, what="the gateway to drop the ended session")
    messages = receive(r.consumers[0], count + 1, timeout_ms=15_000)
    routed_end = decode_consumer_message(messages[-1][0])
    assert isinstance(routed_end, RoutedScanEnd) and routed_end.expected == count


@pytest.mark.timeout(20)
def test_l4_forwards_everything_uninspected_round_robin(rig: Callable[..., Rig]) -> None:
    r = rig(consumers=2, mode="l4")
    producer = r.producer()
    time.sleep(0.3)  # idle longer than the ingress poll interval: L4 must keep running
    for frame in range(4):
        producer.send_multipart([b"not a header", _sector(frame)])
    got = receive(r.consumers[0], 2) + receive(r.consumers[1], 2)
    assert sorted(m[1] for m in got) == [_sector(f) for f in range(4)]
    assert all(m[0] == b"not a header" for m in got)
    assert r.gateway.router is None


@pytest.mark.timeout(20)
def test_l4_refuses_a_configuration_with_several_sessions(rig: Callable[..., Rig]) -> None:
    with pytest.raises(ModeError, match="the configuration has 2"):
        rig(consumers=1, mode="l4", sessions=2)


@pytest.mark.timeout(20)
def test_a_scan_whose_producer_went_silent_is_closed_after_scan_idle_s(
        rig: Callable[..., Rig]) -> None:
    r = rig(consumers=1, limits={"scan_idle_s": 60})
    producer = r.producer()
    producer.send_multipart(begin(producers=2))
    producer.send_multipart(data(1, 0, 0))
    producer.send_multipart(end(sent=1))  # the second producer never ends the scan
    receive(r.consumers[0], 2)
    assert_silent(r.consumers[0])
    r.clock.now += 61
    [closing] = receive(r.consumers[0], 1)
    routed = decode_consumer_message(closing[0])
    assert isinstance(routed, RoutedScanEnd) and (routed.expected, routed.sent) == (1, 1)
    producer.send_multipart(data(1, 1, 0))
    router = r.gateway.router
    assert router is not None
    eventually(lambda: router.drops.get(("s1", "scan_closed"), 0) == 1, timeout_s=5.0,
               what="a scan_closed drop")


@pytest.mark.timeout(20)
def test_a_session_with_hwm_1_still_streams(rig: Callable[..., Rig]) -> None:
    r = rig(consumers=1, limits={"hwm": 1})
    producer = r.producer()
    producer.send_multipart(begin())
    producer.send_multipart(data(1, 0, 0))
    producer.send_multipart(end(sent=1))
    *_, last = (decode_consumer_message(m[0]) for m in receive(r.consumers[0], 3))
    assert isinstance(last, RoutedScanEnd) and last.expected == 1
