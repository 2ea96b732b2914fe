"""The producer SDK and ``dsn producer`` against a real CURVE server socket on loopback."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
from click.testing import CliRunner
from waiting import eventually, tcp_port_closed

from common.keys import KeyPair, create_keypair, load_keypair
from common.protocol import Data, ScanBegin, ScanEnd, decode_producer_header, is_native_header
from dataplane.cli import producer as producer_cli
from dataplane.producer import (
    GatewayUnresponsive,
    HeaderMode,
    Producer,
    ProducerError,
    StreamStats,
    stream_synthetic,
)
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera

pytestmark = pytest.mark.timeout(30)


@dataclass
class Gateway:
    """A test-side ingress: a CURVE server PULL socket (no ZAP, so any client key is admitted)."""

    socket: zmq.Socket
    endpoint: str
    public: bytes

    def receive(self, until_scan_ends: int, timeout_s: float = 10.0) -> list[tuple[bytes, bytes]]:
        """(header, payload) pairs until ``until_scan_ends`` scan_end messages have arrived."""
        messages: list[tuple[bytes, bytes]] = []
        ends = 0
        while ends < until_scan_ends:
            assert self.socket.poll(round(timeout_s * 1000)), f"timed out after {len(messages)}"
            parts = self.socket.recv_multipart()
            messages.append((parts[0], parts[1] if len(parts) > 1 else b""))
            ends += isinstance(decode_producer_header(parts[0]), ScanEnd)
        return messages

    def drain(self, quiet_s: float = 0.3) -> list[bytes]:
        """Headers of everything that arrives until the socket stays quiet for ``quiet_s``."""
        headers = []
        while self.socket.poll(round(quiet_s * 1000)):
            headers.append(self.socket.recv_multipart()[0])
        return headers


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


MakeGateway = Callable[..., Gateway]


@pytest.fixture
def make_gateway(context: zmq.Context) -> Iterator[MakeGateway]:
    """Bind test gateways on random loopback ports; every socket is closed at teardown."""
    sockets: list[zmq.Socket] = []

    def make(public: bytes | None = None, secret: bytes | None = None,
             rcvhwm: int = 1000) -> Gateway:
        if public is None or secret is None:
            public, secret = zmq.curve_keypair()
        sock = context.socket(zmq.PULL)
        sockets.append(sock)
        sock.linger = 0
        sock.rcvhwm = rcvhwm
        sock.curve_server = True
        sock.curve_secretkey = secret
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        return Gateway(sock, f"tcp://127.0.0.1:{port}", public)

    yield make
    for sock in sockets:
        sock.close(linger=0)


@pytest.fixture
def gateway(make_gateway: MakeGateway) -> Gateway:
    return make_gateway()


@pytest.fixture
def client() -> KeyPair:
    return KeyPair(*zmq.curve_keypair())


def _free_endpoint(context: zmq.Context) -> str:
    sock = context.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


def _stream_in_background(gateway: Gateway, client: KeyPair, camera: SyntheticCamera,
                          plan: StreamPlan, header: HeaderMode,
                          ) -> tuple[list[tuple[bytes, bytes]], StreamStats]:
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream_synthetic, gateway.endpoint, gateway.public, client, camera,
                             plan, 7, header=header, progress=False, send_timeout_s=10.0)
        messages = gateway.receive(until_scan_ends=plan.producers)
        return messages, future.result(timeout=10)


def _by_producer(messages: list[tuple[bytes, bytes]]) -> dict[int, list[tuple[Data, bytes]]]:
    data: dict[int, list[tuple[Data, bytes]]] = defaultdict(list)
    for header, payload in messages:
        msg = decode_producer_header(header)
        if isinstance(msg, Data):
            data[msg.sector].append((msg, payload))
    return data


@pytest.mark.parametrize("header", ["native", "ncem"])
def test_stream_synthetic_delivers_the_plan_with_exact_headers_and_payloads(
        gateway: Gateway, client: KeyPair, header: HeaderMode) -> None:
    spec = CameraSpec(scan_shape=(4, 4), seed=3)
    camera = SyntheticCamera(spec)
    plan = StreamPlan(spec, loss_rate=0.1, duplicate_rate=0.1, reorder_window=4, seed=9)
    messages, stats = _stream_in_background(gateway, client, camera, plan, header)

    headers = [decode_producer_header(h) for h, _ in messages]
    begins = [m for m in headers if isinstance(m, ScanBegin)]
    assert len(begins) == 4 and {b.scan for b in begins} == {7}
    assert {(b.scan_shape, b.frame_shape, b.sectors, b.producers) for b in begins} == {
        ((4, 4), (576, 576), 4, 4)}
    data_headers = [h for h, m in zip((h for h, _ in messages), headers, strict=True)
                    if isinstance(m, Data)]
    assert all(is_native_header(h) == (header == "native") for h in data_headers)
    ends = sorted(m.sent for m in headers if isinstance(m, ScanEnd))
    assert ends == sorted(len(plan.messages(p)) for p in range(4))

    for sector, received in _by_producer(messages).items():
        assert [(m.frame, m.sector) for m, _ in received] == plan.messages(sector)
        # An NCEM header's frame_number, read as seq, is the frame's position, as the camera's.
        seqs = (list(range(len(received))) if header == "native"
                else [m.frame for m, _ in received])
        assert [m.seq for m, _ in received] == seqs
        assert all(m.scan == 7 for m, _ in received)
        for msg, payload in received:
            assert payload == camera.sector(msg.frame, sector).tobytes()
    assert stats.messages == plan.total_messages == len(data_headers)
    assert stats.bytes == plan.total_messages * 144 * 576 * 2
    assert (stats.lost, stats.duplicated) == (len(plan.lost), len(plan.duplicated)) != (0, 0)
    assert stats.gbytes_per_s > 0 and stats.messages_per_s > 0


def test_producer_counts_seq_and_returns_sent(gateway: Gateway, client: KeyPair) -> None:
    sector = np.arange(144 * 576, dtype=np.uint16).reshape(144, 576)
    with Producer(gateway.endpoint, gateway.public, client, send_timeout_s=5) as prod:
        prod.begin_scan(3, (2, 2), producers=1)
        for frame in range(3):
            prod.send(frame, 1, sector)
        assert prod.end_scan() == 3
        prod.begin_scan(4, (1, 1), producers=1)
        assert prod.end_scan() == 0
    messages = gateway.receive(until_scan_ends=2)
    kinds = [decode_producer_header(h) for h, _ in messages]
    assert [type(m).__name__ for m in kinds] == [
        "ScanBegin", "Data", "Data", "Data", "ScanEnd", "ScanBegin", "ScanEnd"]
    assert [m.seq for m in kinds if isinstance(m, Data)] == [0, 1, 2]
    assert [(m.scan, m.sent) for m in kinds if isinstance(m, ScanEnd)] == [(3, 3), (4, 0)]
    assert messages[1][1] == sector.tobytes()


@pytest.mark.parametrize(("frame", "sector", "data", "named"), [
    (4, 0, np.zeros((144, 576), np.uint16), "frame 4"),
    (0, 4, np.zeros((144, 576), np.uint16), "sector 4"),
    (0, 0, np.zeros((288, 288), np.uint16), r"shape \(288, 288\)"),
    (0, 0, np.zeros((144, 576), np.float32), "dtype float32"),
    (0, 0, np.zeros((144, 576), ">u2"), "dtype >u2"),
    (0, 0, np.zeros((576, 144), np.uint16).T, "C-contiguous"),
])
def test_bad_sectors_are_refused_before_sending(gateway: Gateway, client: KeyPair, frame: int,
                                                sector: int, data: np.ndarray, named: str) -> None:
    with Producer(gateway.endpoint, gateway.public, client, send_timeout_s=5) as prod:
        prod.begin_scan(0, (2, 2), producers=4)
        with pytest.raises(ProducerError, match=named):
            prod.send(frame, sector, data)
        assert prod.end_scan() == 0


def test_scan_state_errors_name_the_problem(gateway: Gateway, client: KeyPair) -> None:
    with Producer(gateway.endpoint, gateway.public, client, send_timeout_s=5) as prod:
        with pytest.raises(ProducerError, match="before begin_scan"):
            prod.send(0, 0, np.zeros((144, 576), np.uint16))
        with pytest.raises(ProducerError, match="before begin_scan"):
            prod.end_scan()
        with pytest.raises(ProducerError, match="producers=0"):
            prod.begin_scan(0, (2, 2), producers=0)
        with pytest.raises(ProducerError, match="sectors=5"):
            prod.begin_scan(0, (2, 2), producers=1, sectors=5)
        prod.begin_scan(1, (2, 2), producers=1)
        with pytest.raises(ProducerError, match="scan 1 is still open"):
            prod.begin_scan(2, (2, 2), producers=1)


def test_absent_gateway_raises_within_the_timeout(context: zmq.Context, client: KeyPair) -> None:
    endpoint = _free_endpoint(context)
    with Producer(endpoint, zmq.curve_keypair()[0], client, send_timeout_s=0.3) as prod:
        started = time.monotonic()
        with pytest.raises(ProducerError, match="within 0.3 s"):
            prod.begin_scan(0, (1, 1), producers=1)
        assert 0.25 < time.monotonic() - started < 3


def test_a_blocked_send_is_given_up_as_soon_as_abandon_says_why(context: zmq.Context,
                                                                client: KeyPair) -> None:
    asked: list[int] = []

    def moved_on_the_second_ask() -> str | None:
        asked.append(1)
        return "the session moved" if len(asked) == 2 else None

    endpoint = _free_endpoint(context)
    with Producer(endpoint, zmq.curve_keypair()[0], client, send_timeout_s=300,
                  abandon=moved_on_the_second_ask) as prod:
        with pytest.raises(GatewayUnresponsive,
                           match="scan_begin of scan 0 not accepted by .*, given up: the session "
                                 "moved"):
            prod.begin_scan(0, (1, 1), producers=1)
    assert len(asked) == 2


def test_a_blocked_send_that_abandon_keeps_waiting_ends_at_its_timeout(
        context: zmq.Context, client: KeyPair) -> None:
    asked: list[int] = []

    def keep_waiting() -> str | None:
        asked.append(1)
        return None

    endpoint = _free_endpoint(context)
    with Producer(endpoint, zmq.curve_keypair()[0], client, send_timeout_s=2.5,
                  abandon=keep_waiting) as prod:
        with pytest.raises(GatewayUnresponsive, match="within 2.5 s"):
            prod.begin_scan(0, (1, 1), producers=1)
    assert len(asked) >= 1  # asked while it waited, every ABANDON_CHECK_S


def test_a_connected_gateway_that_does_not_read_is_waited_for_without_asking_abandon(
        make_gateway: MakeGateway, client: KeyPair) -> None:
    stalled = make_gateway(rcvhwm=1)
    asked: list[int] = []

    def would_give_up() -> str | None:
        asked.append(1)
        return "the session moved"

    sector = np.ones((144, 576), np.uint16)
    with Producer(stalled.endpoint, stalled.public, client, hwm=1, send_timeout_s=2.5,
                  abandon=would_give_up) as prod:
        prod.begin_scan(0, (40, 40), producers=1)
        with pytest.raises(GatewayUnresponsive, match="within 2.5 s"):
            for frame in range(1600):
                prod.send(frame, 0, sector)
    assert asked == []  # backpressure, not a lost gateway
    stalled.drain()


def test_a_gateway_with_another_server_key_never_gets_data(gateway: Gateway,
                                                           client: KeyPair) -> None:
    wrong_server_key = zmq.curve_keypair()[0]
    with (Producer(gateway.endpoint, wrong_server_key, client, send_timeout_s=0.3) as prod,
          pytest.raises(ProducerError, match="unreachable, refused")):
        prod.begin_scan(0, (1, 1), producers=1)
    assert gateway.drain(quiet_s=0.1) == []


def test_backpressure_blocks_the_producer_and_drops_nothing(make_gateway: MakeGateway,
                                                            client: KeyPair) -> None:
    stalled = make_gateway(rcvhwm=1)
    sector = np.ones((144, 576), np.uint16)
    accepted = 0
    with Producer(stalled.endpoint, stalled.public, client, hwm=1, send_timeout_s=0.2) as prod:
        prod.begin_scan(0, (40, 40), producers=1)
        with pytest.raises(ProducerError, match="not reading"):
            for frame in range(1600):
                prod.send(frame, 0, sector)
                accepted += 1
        assert 0 < accepted < 1600
        headers = stalled.drain()
    data = [decode_producer_header(h) for h in headers[1:]]
    assert [m.seq for m in data if isinstance(m, Data)] == list(range(accepted))
    assert len(data) == accepted


def test_bad_endpoint_or_key_fails_at_construction(client: KeyPair) -> None:
    with pytest.raises(ProducerError, match="nowhere"):
        Producer("nowhere", zmq.curve_keypair()[0], client)
    with pytest.raises(ProducerError, match="no secret key"):
        Producer("tcp://127.0.0.1:1", zmq.curve_keypair()[0], KeyPair(client.public, None))
    with pytest.raises(ProducerError, match="'json'"):
        Producer("tcp://127.0.0.1:1", zmq.curve_keypair()[0], client, header="json")  # type: ignore[arg-type]


# --- dsn producer -------------------------------------------------------------------------------

def _keys(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    server_pub, server_sec = create_keypair(tmp_path / "server", "gateway")
    client_pub, client_sec = create_keypair(tmp_path / "client", "producer")
    return server_pub, server_sec, client_pub, client_sec


def test_stream_command_streams_a_scan_and_prints_a_summary(make_gateway: MakeGateway,
                                                            tmp_path: Path) -> None:
    server_pub, server_sec, _, client_sec = _keys(tmp_path)
    server = load_keypair(server_sec)
    gateway = make_gateway(server.public, server.secret)
    received: list[tuple[bytes, bytes]] = []
    receiver = threading.Thread(target=lambda: received.extend(gateway.receive(4)))
    receiver.start()
    result = CliRunner().invoke(producer_cli, [
        "stream", "--endpoint", gateway.endpoint, "--server-key", str(server_pub),
        "--client-key", str(client_sec), "--scan", "2", "--scan-shape", "2x3", "--seed", "1",
        "--duplicates", "0.25", "--header", "ncem", "--electrons", "5", "--dark", "--timeout", "5",
        "--no-receipt"])  # a bare PULL socket stands in for the gateway: it answers no receipts
    receiver.join(timeout=10)
    assert result.exit_code == 0, result.output
    assert "scan 2: 30 messages" in result.output and "duplicated 6" in result.output
    assert "scan 2: delivery not confirmed" in result.output
    data = [decode_producer_header(h) for h, _ in received]
    assert sum(isinstance(m, Data) for m in data) == 30


@pytest.mark.parametrize("shape", ["3by3", "0x4", "x", "4x-1"])
def test_stream_command_rejects_a_bad_scan_shape(tmp_path: Path, shape: str) -> None:
    server_pub, _, _, client_sec = _keys(tmp_path)
    result = CliRunner().invoke(producer_cli, [
        "stream", "--endpoint", "tcp://127.0.0.1:1", "--server-key", str(server_pub),
        "--client-key", str(client_sec), "--scan-shape", shape])
    assert result.exit_code == 2
    assert "--scan-shape" in result.output and "ROWSxCOLS" in result.output


@pytest.mark.parametrize("lanes, says", [
    (["--endpoint", "tcp://127.0.0.1:1", "--endpoint", "tcp://127.0.0.1:1"],
     "an --endpoint is given twice: each lane is another gateway"),
    (["--endpoint", "tcp://127.0.0.1:1", "--endpoint", "tcp://127.0.0.1:3",
      "--receipts", "tcp://127.0.0.1:2"],
     "2 --endpoint but 1 --receipts: give one --receipts per --endpoint, or none"),
    ([arg for port in range(1, 11, 2) for arg in ("--endpoint", f"tcp://127.0.0.1:{port}")],
     "5 lanes for 4 producers (one per sector): each lane needs a producer"),
    (["--endpoint", "tcp://127.0.0.1:1", "--endpoint", "tcp://127.0.0.1:3", "--spool", "x"],
     "--spool replays through one gateway: give one --endpoint"),
])
def test_stream_command_refuses_lanes_it_cannot_stream(tmp_path: Path, lanes: list[str],
                                                       says: str) -> None:
    server_pub, _, _, client_sec = _keys(tmp_path)
    (tmp_path / "x").write_bytes(b"")
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(producer_cli, [
            "stream", *lanes, "--server-key", str(server_pub), "--client-key", str(client_sec)])
    assert result.exit_code == 2, result.output
    assert says in result.output


def test_stream_command_takes_one_server_key_for_all_lanes_or_one_each(tmp_path: Path) -> None:
    server_pub, _, _, client_sec = _keys(tmp_path)
    lanes = [arg for port in (1, 3, 5) for arg in ("--endpoint", f"tcp://127.0.0.1:{port}")]
    result = CliRunner().invoke(producer_cli, [
        "stream", *lanes, "--server-key", str(server_pub), "--server-key", str(server_pub),
        "--client-key", str(client_sec)])
    assert result.exit_code == 2
    assert ("3 --endpoint but 2 --server-key: give one --server-key for all, or one per "
            "--endpoint") in result.output


def test_stream_command_rejects_unusable_keys(tmp_path: Path) -> None:
    server_pub, _, client_pub, client_sec = _keys(tmp_path)
    runner = CliRunner()

    def run(server: Path, client: Path) -> tuple[int, str]:
        result = runner.invoke(producer_cli, ["stream", "--endpoint", "tcp://127.0.0.1:1",
                                              "--server-key", str(server),
                                              "--client-key", str(client)])
        assert isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.output

    code, output = run(tmp_path / "missing.key", client_sec)
    assert code == 2 and "--server-key" in output and "missing.key" in output
    code, output = run(server_pub, client_pub)
    assert code == 2 and "no secret key" in output
    os.chmod(client_sec, 0o644)
    code, output = run(server_pub, client_sec)
    assert code == 2 and "chmod 600" in output


def test_stream_command_reports_an_unreachable_gateway_without_a_traceback(
        context: zmq.Context, tmp_path: Path) -> None:
    server_pub, _, _, client_sec = _keys(tmp_path)
    result = CliRunner().invoke(producer_cli, [
        "stream", "--endpoint", _free_endpoint(context), "--server-key", str(server_pub),
        "--client-key", str(client_sec), "--scan-shape", "1x1", "--timeout", "0.2"])
    assert result.exit_code == 1
    assert "unreachable" in result.output and "Traceback" not in result.output


def test_keygen_writes_a_key_pair_and_prints_the_public_key(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(producer_cli, ["keygen", "--out", str(tmp_path / "k"), "--name", "cam"])
    assert result.exit_code == 0, result.output
    public = load_keypair(tmp_path / "k" / "cam.key").public
    assert public.decode() in result.output.split()
    assert (tmp_path / "k" / "cam.key_secret").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(producer_cli, ["keygen", "--out", str(tmp_path / "k"), "--name", "cam"])
    assert again.exit_code == 1 and "already exists" in again.output
    assert load_keypair(tmp_path / "k" / "cam.key").public == public
    bad = runner.invoke(producer_cli, ["keygen", "--out", str(tmp_path), "--name", "../x"])
    assert bad.exit_code == 2 and "--name" in bad.output


def _restartable_ingress(context: zmq.Context, secret: bytes, endpoint: str | None = None,
                         **options: int) -> tuple[zmq.Socket, str]:
    """A CURVE PULL bound to ``endpoint`` (a free loopback port if None), with socket options."""
    sock = context.socket(zmq.PULL)
    sock.linger = 0
    sock.curve_server, sock.curve_secretkey = True, secret
    for name, value in options.items():
        setattr(sock, name, value)
    if endpoint is None:
        return sock, f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    sock.bind(endpoint)
    return sock, endpoint


def _wait_for_the_producer_to_see_the_break(endpoint: str) -> None:
    # Its end of the connection closes once it has.
    port = int(endpoint.rsplit(":", 1)[1])
    eventually(lambda: tcp_port_closed(port), timeout_s=5.0,
               what="the producer to see the gateway's connection close")


def test_after_a_gateway_restart_the_open_scan_is_announced_again_before_more_data(
        context: zmq.Context, client: KeyPair) -> None:
    public, secret = zmq.curve_keypair()

    def ingress(endpoint: str | None = None) -> tuple[zmq.Socket, str]:
        return _restartable_ingress(context, secret, endpoint)

    sector = np.zeros((144, 576), np.uint16)
    first, endpoint = ingress()
    with Producer(endpoint, public, client, send_timeout_s=10) as prod:
        prod.begin_scan(5, (2, 2), producers=1)
        prod.send(0, 0, sector)
        assert [type(decode_producer_header(first.recv_multipart()[0])).__name__
                for _ in range(2)] == ["ScanBegin", "Data"]
        first.close(linger=0)  # the gateway dies
        # Here the producer sees the break before it sends again (a blocked send: below).
        _wait_for_the_producer_to_see_the_break(endpoint)
        second, _ = ingress(endpoint)  # a new gateway on the same endpoint
        prod.send(1, 0, sector)
        assert prod.end_scan() == 2
        assert prod.reannounced == 1
    headers = [decode_producer_header(second.recv_multipart()[0]) for _ in range(3)]
    second.close(linger=0)
    begin, data, end = headers
    assert isinstance(begin, ScanBegin) and begin.scan == 5
    assert isinstance(data, Data) and (data.frame, data.seq) == (1, 1)
    assert isinstance(end, ScanEnd) and end.sent == 2


def test_a_send_blocked_when_the_gateway_dies_waits_for_the_scan_to_be_announced_again(
        context: zmq.Context, client: KeyPair) -> None:
    """The gateway stops reading, the producer blocks at its high-water mark, the gateway dies
    and another binds the endpoint: the blocked sector must not reach it before the scan_begin,
    or that gateway would drop it as of an unknown scan (and a blocked scan_end the same way,
    leaving the scan open)."""
    public, secret = zmq.curve_keypair()
    first, endpoint = _restartable_ingress(context, secret, rcvhwm=1, rcvbuf=64 * 1024)
    sector = np.zeros((144, 576), np.uint16)
    frames = 256
    sent = [0]
    with Producer(endpoint, public, client, hwm=1, send_timeout_s=20) as prod, \
            ThreadPoolExecutor(1) as pool:
        prod.begin_scan(5, (16, 16), producers=1)
        assert isinstance(decode_producer_header(first.recv_multipart()[0]), ScanBegin)

        def stream() -> int:
            for frame in range(frames):
                prod.send(frame, 0, sector)
                sent[0] += 1
            return prod.end_scan()

        streaming = pool.submit(stream)
        last = [-1]

        def blocked() -> bool:
            stalled, last[0] = sent[0] == last[0], sent[0]
            return stalled

        # The queues hold a few sectors; the producer then blocks in a send.
        eventually(blocked, timeout_s=10, what="the producer blocked", interval_s=0.5)
        assert sent[0] < frames
        first.close(linger=0)  # the gateway dies
        _wait_for_the_producer_to_see_the_break(endpoint)
        second, _ = _restartable_ingress(context, secret, endpoint)
        try:
            headers = [decode_producer_header(h) for h, _ in Gateway(second, endpoint, public)
                       .receive(until_scan_ends=1)]
        finally:
            second.close(linger=0)
        assert streaming.result(timeout=10) == frames
    assert prod.reannounced == 1
    assert isinstance(headers[0], ScanBegin) and headers[0].scan == 5
    data = headers[1:-1]
    assert data and all(isinstance(h, Data) and h.scan == 5 for h in data)
    assert isinstance(headers[-1], ScanEnd) and headers[-1].sent == frames
