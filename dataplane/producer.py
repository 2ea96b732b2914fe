"""Producer SDK: stream detector sectors into a DSN gateway over CURVE, and a synthetic streamer.

A ``Producer`` owns one PUSH socket, a CURVE client of the gateway's ingress. It speaks the wire
protocol of ``common.protocol``: ``scan_begin``, then one ``data`` message per sector, then
``scan_end {sent}``. ``replay_spool`` sends a gateway spool file (``dataplane.spool``) the same way,
or the spool files of one scan's lanes as one scan. ``stream_synthetic`` given several endpoints
splits the scan over that many gateways (lanes: ``begin_scan(lane=...)``, docs/architecture.md).
In "ncem" header mode, data messages carry the NCEM 4D Camera header instead of
the native one (the scan messages stay native), as existing 4D Camera receivers do.

Backpressure, never loss: the socket queues only to a live, authenticated connection
(``ZMQ_IMMEDIATE``) and blocks at its high-water mark, so a stalled gateway slows the producer. A
send that cannot complete within ``send_timeout_s`` raises ``ProducerError``; the message was not
queued. Closing waits up to ``send_timeout_s`` for queued messages to leave.

Reconnects: ZeroMQ reconnects by itself when the gateway restarts. A restarted gateway knows
nothing of the scan under way, so once the connection broke the producer sends its open scan's
``scan_begin`` again before its next message (``reannounced`` counts them; the send blocks until
the new connection is up, so that announcement goes first; a send already blocked when the
connection broke waits for it too) and the rest of the scan flows.
Messages that were in flight when the connection broke are lost; the consumer lists each missing
sector.

``ProducerSession`` opens the session itself over the control plane's REST API with a project
token (through ``common.client.Client``), registering the producer's CURVE public key, and streams
to the gateway endpoint and server key the control plane returned. With ``transport="plain"``
(only where the policy allows unencrypted transport) it streams to the gateway's plaintext
ingress instead, authenticated by ``PlainCredentials`` (session id, session token signature);
every function that connects takes ``plain=`` for that.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Never, Self, cast

import msgspec
import numpy as np
import zmq
from tqdm import tqdm
from zmq.utils.monitor import recv_monitor_message

from common.client import (
    DEFAULT_TEMPLATE,
    Client,
    GatewayInfo,
    OpenedSession,
    Session,
    Transport,
)
from common.clitypes import one_for_each
from common.credentials import PlainCredentials
from common.keys import KeyPair, load_secret_keypair
from common.protocol import (
    MAX_LANES,
    VERSION,
    Data,
    NcemHeader,
    ProtocolError,
    ScanBegin,
    ScanEnd,
    ScanGeometry,
    decode_producer_header,
    encode,
    encode_ncem,
)
from common.restclient import ClientError
from dataplane.errors import DataPlaneError
from dataplane.spool import SpoolError, SpoolInfo, SpoolReader
from dataplane.synthetic import StreamPlan, SyntheticCamera

HeaderMode = Literal["native", "ncem"]
Shape = tuple[int, int]
LaneOf = tuple[int, int]  # (lane, lanes)
_SECTOR_DTYPE = np.dtype("<u2")


# Asked while a send is blocked with no connection to the gateway (a connected gateway that does
# not read is backpressure, and is waited for): a reason to give the stream up now (the session
# has moved to another gateway, say), or None to go on waiting.
Abandon = Callable[[], str | None]
ABANDON_CHECK_S = 1.0
# A blocked send wakes every SEND_SLICE_MS to look at the connection. It is shorter than the
# reconnect interval, so a send cannot outlast a break and land on the new connection before the
# open scan is announced there again.
SEND_SLICE_MS = 50
RECONNECT_IVL_MS = 100


class ProducerError(DataPlaneError):
    """A producer that cannot send: bad input, or a gateway that is unreachable or stalled."""


class GatewayUnresponsive(ProducerError):
    """The gateway took no message or gave no answer in time: unreachable, stalled, gone, or it
    refused this CURVE key."""


@dataclass
class _OpenScan:
    scan: int
    geometry: ScanGeometry
    begin: bytes
    seq: int = 0


class Producer:
    """One PUSH socket, a CURVE client (or, with ``plain``, a PLAIN client) of a gateway ingress."""

    def __init__(self, endpoint: str, server_public: bytes | None, client: KeyPair | None, *,
                 hwm: int = 256, send_timeout_s: float = 30.0, header: HeaderMode = "native",
                 context: zmq.Context[zmq.Socket[bytes]] | None = None,
                 plain: PlainCredentials | None = None, abandon: Abandon | None = None) -> None:
        if header not in ("native", "ncem"):
            raise ProducerError(f"header must be 'native' or 'ncem', got {header!r}")
        if plain is None and (server_public is None or client is None):
            raise ProducerError("CURVE needs the gateway's server key and a client key pair")
        if plain is None and client is not None and client.secret is None:
            raise ProducerError("the client key pair has no secret key (load a .key_secret file)")
        if not send_timeout_s > 0:
            raise ProducerError(f"send_timeout_s must be positive, got {send_timeout_s}")
        self.endpoint = endpoint
        self._header = header
        self._timeout_s = send_timeout_s
        self._abandon = abandon
        self._scan: _OpenScan | None = None
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.PUSH)
        self.reannounced = 0
        self._connected = False  # a handshake with the gateway succeeded, and holds
        self._broke = False  # the connection broke since _connection_broke last said so
        try:
            self._configure(server_public, client, plain, hwm)
            self._monitor = self._socket.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close(linger_s=0)
            raise ProducerError(f"cannot connect to {endpoint!r}: {exc}") from None

    def _configure(self, server_public: bytes | None, client: KeyPair | None,
                   plain: PlainCredentials | None, hwm: int) -> None:
        timeout_ms = max(1, round(self._timeout_s * 1000))
        sock = self._socket
        if plain is not None:
            sock.plain_username = plain.username.encode("ascii")
            sock.plain_password = plain.password.encode("ascii")
        else:
            assert server_public is not None and client is not None  # checked by __init__
            sock.curve_serverkey = server_public
            sock.curve_publickey = client.public
            sock.curve_secretkey = client.secret
        sock.sndhwm = hwm
        slice_ms = min(timeout_ms, SEND_SLICE_MS)
        sock.sndtimeo = slice_ms
        sock.reconnect_ivl = RECONNECT_IVL_MS
        self._slice_s = slice_ms / 1000
        # Queue only to a connection whose CURVE handshake succeeded, so that an absent gateway or
        # a refused key blocks the sender instead of filling a queue nobody will read.
        sock.immediate = 1
        sock.linger = timeout_ms

    def begin_scan(self, scan: int, scan_shape: tuple[int, int], producers: int,
                   frame_shape: tuple[int, int] = (576, 576), sectors: int = 4,
                   lane: LaneOf | None = None) -> None:
        """Announce a scan; every data message until ``end_scan`` belongs to it.

        ``lane`` (index, count): the scan is split over that many gateways and this producer
        streams lane ``index`` of it; ``producers`` then counts this lane's producers."""
        if self._scan is not None:
            raise ProducerError(f"scan {self._scan.scan} is still open; call end_scan first")
        index, count = (None, None) if lane is None else lane
        try:
            # Decoding below checks that both shapes hold exactly two sizes.
            begin = ScanBegin(v=VERSION, scan=scan, scan_shape=cast(Shape, tuple(scan_shape)),
                              frame_shape=cast(Shape, tuple(frame_shape)), sectors=sectors,
                              producers=producers, dtype="uint16", lane=index, lanes=count)
            header = encode(begin)
            # The protocol's bounds apply on decoding, so a bad scan fails here, not at the gateway.
            decode_producer_header(header)
        except (ProtocolError, ValueError, TypeError, msgspec.EncodeError) as exc:
            raise ProducerError(f"invalid scan {scan} (scan_shape={scan_shape}, frame_shape="
                                f"{frame_shape}, sectors={sectors}, producers={producers}"
                                f"{'' if lane is None else f', lane={lane}'}): {exc}") from None
        self._connection_broke()  # a break before this scan needs no second announcement
        self._send([header], f"scan_begin of scan {scan}")
        self._scan = _OpenScan(scan, begin.geometry, header)

    def send(self, frame: int, sector: int, data: np.ndarray) -> None:
        """Send one sector without copying it: ``data`` must not change until it has left.

        Blocks while the gateway applies backpressure; raises ProducerError after send_timeout_s.
        """
        scan = self._open_scan("send")
        frame, sector = int(frame), int(sector)
        _check_sector(scan.geometry, frame, sector, data)
        self._announce_again_after_reconnect(scan)
        self._send([self._data_header(scan, frame, sector), data.data],
                   f"scan {scan.scan} frame {frame} sector {sector}", scan)
        scan.seq += 1

    def end_scan(self) -> int:
        """Send ``scan_end {sent}`` and return ``sent``, the data messages sent for the scan."""
        scan = self._open_scan("end_scan")
        self._announce_again_after_reconnect(scan)
        self._send([encode(ScanEnd(v=VERSION, scan=scan.scan, sent=scan.seq))],
                   f"scan_end of scan {scan.scan}", scan)
        self._scan = None
        return scan.seq

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket, waiting up to ``linger_s`` (default send_timeout_s) to flush it."""
        if self._socket.closed:
            return
        linger = self._timeout_s if linger_s is None else linger_s
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self._socket.disable_monitor()
            monitor.close(linger=0)
        self._socket.close(linger=round(linger * 1000))
        if self._own_context:
            self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # After a failure the scan is incomplete anyway; do not wait on a gateway that stalled.
        self.close(linger_s=0 if exc_type is not None else None)

    def _watch_connection(self) -> None:
        """Take the monitor's events: whether the connection is up, and whether it broke."""
        # EVENTS is cheaper than a poll, and this runs before every message.
        # pyzmq types every option's value as int | bytes; EVENTS is always an int.
        while cast(int, self._monitor.get(zmq.EVENTS)) & zmq.POLLIN:
            if recv_monitor_message(self._monitor)["event"] == zmq.EVENT_DISCONNECTED:
                self._connected, self._broke = False, True
            else:
                self._connected = True

    def _abandon_reason(self) -> str | None:
        """``abandon``'s answer while there is no connection to the gateway; a gateway that is
        connected but not reading (backpressure) is waited for, and ``abandon`` not asked."""
        self._watch_connection()
        if self._abandon is None or self._connected:
            return None
        return self._abandon()

    def _connection_broke(self) -> bool:
        """Whether the connection to the gateway broke since the last call."""
        self._watch_connection()
        broke, self._broke = self._broke, False
        return broke

    def _announce_again_after_reconnect(self, scan: _OpenScan) -> None:
        if self._connection_broke():
            self._send([scan.begin], f"scan_begin of scan {scan.scan} after a reconnect")
            self.reannounced += 1

    def _open_scan(self, action: str) -> _OpenScan:
        if self._scan is None:
            raise ProducerError(f"{action} before begin_scan: no scan is open")
        return self._scan

    def _data_header(self, scan: _OpenScan, frame: int, sector: int) -> bytes:
        if self._header == "native":
            return encode(Data(v=VERSION, scan=scan.scan, frame=frame, sector=sector, seq=scan.seq))
        rows, cols = scan.geometry.scan_shape
        row, col = divmod(frame, cols)
        # As the 4D Camera's own: frame_number is the flat position x and y name.
        return encode_ncem(NcemHeader(scan_number=scan.scan, frame_number=frame,
                                      positions_per_row=cols, rows=rows, x_in_row=col,
                                      row_in_scan=row, thread_id=sector, module=sector))

    def _send(self, parts: list[bytes | memoryview], what: str,
              scan: _OpenScan | None = None) -> None:
        """Send one message, blocking up to the send timeout; a connection that breaks while
        it waits has ``scan`` announced on the next connection before the message goes."""
        waited_s = asked_s = 0.0  # counted in the socket's send timeouts: no clock per message
        while True:
            try:
                # A message is queued whole or not at all, so a send that timed out may be
                # tried again.
                self._socket.send_multipart(parts, copy=False)
                return
            except zmq.Again:
                waited_s += self._slice_s
                if waited_s >= self._timeout_s:
                    raise GatewayUnresponsive(
                        f"{what} not accepted by {self.endpoint} within {self._timeout_s:g} s: "
                        "the gateway is unreachable, refused this CURVE key, or is not reading"
                    ) from None
                if waited_s - asked_s >= ABANDON_CHECK_S:
                    asked_s = waited_s
                    reason = self._abandon_reason()
                    if reason is not None:
                        raise GatewayUnresponsive(f"{what} not accepted by {self.endpoint}, "
                                                  f"given up: {reason}") from None
                if scan is not None:
                    self._announce_again_after_reconnect(scan)
            except zmq.ZMQError as exc:
                raise ProducerError(f"{what} to {self.endpoint} failed: {exc}") from None


def _check_sector(geometry: ScanGeometry, frame: int, sector: int, data: np.ndarray) -> None:
    if not (0 <= frame < geometry.positions and 0 <= sector < geometry.sectors):
        raise ProducerError(f"frame {frame} sector {sector} outside the scan "
                            f"({geometry.positions} frames, {geometry.sectors} sectors)")
    if data.shape != geometry.sector_shape:
        raise ProducerError(f"sector data has shape {data.shape}, expected {geometry.sector_shape}")
    if data.dtype != _SECTOR_DTYPE:
        raise ProducerError(f"sector data has dtype {data.dtype}, expected little-endian uint16")
    if not data.flags.c_contiguous:
        raise ProducerError("sector data must be C-contiguous (use np.ascontiguousarray)")


@dataclass(frozen=True)
class StreamStats:
    messages: int  # data messages sent, duplicates included
    bytes: int  # payload bytes of those messages
    seconds: float
    lost: int  # (frame, sector) pairs the plan never sent
    duplicated: int  # pairs the plan sent twice

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def stream_synthetic(endpoint: str | Sequence[str], server_public: bytes | Sequence[bytes] | None,
                     client: KeyPair | None, camera: SyntheticCamera, plan: StreamPlan,
                     scan: int = 0, *, header: HeaderMode = "native",
                     progress: bool | None = None, hwm: int = 256, send_timeout_s: float = 30.0,
                     plain: PlainCredentials | None = None,
                     abandon: Abandon | None = None) -> StreamStats:
    """Stream one synthetic scan with ``plan.producers`` producers, one thread and socket each.

    ``endpoint``: the gateway's ingress, or several (one per lane, each a gateway serving the
    session; ``server_public`` one key for all, or one per lane): producer p streams lane
    p mod lanes, so each lane carries whole sector streams and needs one producer at least.
    ``progress`` None shows a progress bar only when the output is a terminal. The first producer
    error stops the others and is raised once every thread has finished. ``abandon`` is asked,
    from any of the threads, while a send is blocked (``Producer``).
    """
    if plan.spec != camera.spec:
        raise ProducerError("the stream plan and the camera describe different scans")
    lanes = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    if not 1 <= len(lanes) <= min(plan.producers, MAX_LANES):
        raise ProducerError(f"{len(lanes)} lanes for {plan.producers} producers: each lane needs "
                            f"a producer, and there are at most {MAX_LANES}")
    run = _StreamRun(lanes, _per_lane(server_public, len(lanes)), client, camera, plan, scan,
                     header, hwm, send_timeout_s, plain, abandon)
    # Each connection is encrypted on one libzmq I/O thread: one per producer, up to the cores.
    context = zmq.Context(io_threads=max(1, min(plan.producers, os.cpu_count() or 1)))
    bar = tqdm(total=plan.total_messages, unit="msg", desc=f"scan {scan}",
               disable=None if progress is None else not progress)
    start = time.perf_counter()
    try:
        threads = [threading.Thread(target=run.produce, args=(p, context, bar),
                                    name=f"dsn-producer-{p}") for p in range(plan.producers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        # Terminating the context waits for queued messages to leave, so it is part of the time.
        context.term()
        seconds = time.perf_counter() - start
        bar.close()
    if run.errors:
        raise run.errors[0]
    sector_bytes = camera.spec.sector_rows * camera.spec.frame_shape[1] * _SECTOR_DTYPE.itemsize
    return StreamStats(messages=plan.total_messages, bytes=plan.total_messages * sector_bytes,
                       seconds=seconds, lost=len(plan.lost), duplicated=len(plan.duplicated))


def _per_lane(keys: bytes | Sequence[bytes] | None, lanes: int) -> list[bytes | None]:
    """The gateway's server key for each lane: one for all, or one each."""
    if keys is None or isinstance(keys, bytes):
        return [keys] * lanes
    each = one_for_each(keys, lanes)
    if each is None:
        raise ProducerError(f"{len(keys)} server keys for {lanes} lanes: give one for all, or one "
                            "per lane")
    return list(each)


@dataclass
class _StreamRun:
    lanes: list[str]  # an endpoint per lane
    server_public: list[bytes | None]  # the server key of each lane's gateway
    client: KeyPair | None
    camera: SyntheticCamera
    plan: StreamPlan
    scan: int
    header: HeaderMode
    hwm: int
    send_timeout_s: float
    plain: PlainCredentials | None
    abandon: Abandon | None

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[Exception] = []

    def produce(self, producer: int, context: zmq.Context[zmq.Socket[bytes]],
                bar: tqdm[Never]) -> None:
        spec = self.camera.spec
        count = len(self.lanes)
        lane = producer % count
        # This lane's producers: those whose number is the lane's modulo the lane count.
        producers = len(range(lane, self.plan.producers, count))
        try:
            with Producer(self.lanes[lane], self.server_public[lane], self.client, hwm=self.hwm,
                          send_timeout_s=self.send_timeout_s, header=self.header,
                          context=context, plain=self.plain, abandon=self.abandon) as sock:
                sock.begin_scan(self.scan, spec.scan_shape, producers, spec.frame_shape,
                                spec.sectors, None if count == 1 else (lane, count))
                for frame, sector in self.plan.messages(producer):
                    if self.stop.is_set():
                        sock.close(linger_s=0)
                        return
                    sock.send(frame, sector, self.camera.sector(frame, sector))
                    bar.update(1)
                sock.end_scan()
        # Any failure in a thread must reach the caller, and must stop the sibling producers.
        except Exception as exc:  # noqa: BLE001
            self.errors.append(exc)
            self.stop.set()


def replay_spool(path: Path | Sequence[Path], endpoint: str, server_public: bytes | None,
                 client: KeyPair | None, *, scan: int | None = None,
                 progress: bool | None = None, send_timeout_s: float = 30.0,
                 plain: PlainCredentials | None = None,
                 abandon: Abandon | None = None) -> StreamStats:
    """Replay a gateway spool file, or the spool files of one scan's lanes, into a session as
    one producer.

    Every file is validated before anything is sent; several must hold the same scan (number
    and geometry: each lane's gateway spools its own part). Then: scan_begin with
    ``producers=1``, one lane, and the spooled geometry (scan number ``scan``, or the spooled
    one), every data record of each file in spooled order with its frame and sector and a fresh
    ``seq``, and scan_end. ``lost`` in the result is the number of messages the spooling
    gateways listed in the spools' loss manifests; a spool never holds duplicates it did not
    receive, so ``duplicated`` is 0.
    """
    paths = [path] if isinstance(path, Path) else list(path)
    with ExitStack() as stack:
        readers = [stack.enter_context(_open_spool(p)) for p in paths]
        info = _one_scan(paths, readers)
        number = info.scan if scan is None else scan
        begin = info.begin
        records = sum(r.info.records for r in readers)
        bar = stack.enter_context(tqdm(total=records, unit="msg", desc=f"scan {number}",
                                       disable=None if progress is None else not progress))
        start = time.perf_counter()
        with Producer(endpoint, server_public, client, send_timeout_s=send_timeout_s,
                      plain=plain, abandon=abandon) as sock:
            sock.begin_scan(number, begin.scan_shape, 1, begin.frame_shape, begin.sectors)
            for file, reader in zip(paths, readers, strict=True):
                try:
                    _replay_records(sock, reader, begin.geometry.sector_shape, bar)
                except SpoolError as exc:
                    raise ProducerError(f"{file}: {exc}") from None
            sock.end_scan()
    return StreamStats(messages=records, bytes=sum(r.info.bytes for r in readers),
                       seconds=time.perf_counter() - start,
                       lost=sum(len(r.info.manifest.drops) for r in readers), duplicated=0)


def _open_spool(path: Path) -> SpoolReader:
    try:
        return SpoolReader(path)
    except OSError as exc:
        raise ProducerError(f"cannot read spool {path}: {exc.strerror}") from None
    except SpoolError as exc:
        raise ProducerError(f"{path}: {exc}") from None


def _one_scan(paths: list[Path], readers: list[SpoolReader]) -> SpoolInfo:
    """The first spool's header, once every other spool is known to hold the same scan."""
    first = readers[0].info
    for path, reader in zip(paths[1:], readers[1:], strict=True):
        info = reader.info
        if (info.session, info.scan, info.begin.geometry) != (
                first.session, first.scan, first.begin.geometry):
            raise ProducerError(f"{path} holds scan {info.scan} of session {info.session} "
                                f"({info.begin.geometry}), {paths[0]} scan {first.scan} of "
                                f"session {first.session} ({first.begin.geometry}): the spools "
                                "of one replay must be the lanes of one scan")
    return first


def _replay_records(sock: Producer, reader: SpoolReader, sector_shape: Shape,
                    bar: tqdm[Never]) -> None:
    for msg, payload in reader.records():
        # Each payload is its own bytes object, so the zero-copy send may keep it until it leaves.
        sock.send(msg.frame, msg.sector,
                  np.frombuffer(payload, _SECTOR_DTYPE).reshape(sector_shape))
        bar.update(1)


class GatewayTarget(NamedTuple):
    """A gateway ingress and the credentials for it (``plain`` set: PLAIN, else CURVE), and the
    gateway's receipts endpoint (None: unknown, delivery cannot be confirmed)."""

    endpoint: str
    server_public: bytes
    client: KeyPair
    plain: PlainCredentials | None = None
    receipts: str | None = None


class ProducerSession:
    """A session this producer opens over REST, and streams into; a context manager.

    ``controlplane`` is the facility client holding the project token; ``project`` defaults to
    the token's. ``client`` is the producer's CURVE key pair, a ``.key_secret`` file to load it
    from, or None for a fresh in-memory pair; its public key is registered when the session opens
    (on entering the ``with`` block, or ``open()``). With ``end_on_exit`` the session is ended on
    leaving the block, so the gateway stops admitting the key at once rather than at expiry. With
    ``transport="plain"`` the session is opened for unencrypted transport (refused unless the
    policy allows it) and every stream goes to the gateway's plaintext ingress. Control-plane
    failures raise ``common.client.ClientError``.

    With ``session_id`` it opens nothing: it streams into that open session of the project (one
    opened in the console, say), whose registered producer key ``client`` must be; only over
    CURVE, since a session's token is shown once, to whoever opened it.

    ``lanes`` above 1 opens a session whose scans are split over that many gateways (the control
    plane places one lane on each): ``stream_synthetic`` then streams producer p to lane
    p mod lanes, and ``gateways()`` lists where each lane goes.
    """

    def __init__(self, controlplane: Client, *, project: str | None = None,
                 template: str = DEFAULT_TEMPLATE, params: dict[str, Any] | None = None,
                 client: KeyPair | Path | None = None, ttl: int | None = None,
                 end_on_exit: bool = False, transport: Transport = "curve",
                 session_id: str | None = None, lanes: int = 1) -> None:
        if session_id is not None and (client is None or transport != "curve"):
            raise ProducerError("streaming into an open session needs the producer key pair "
                                "registered on it, and CURVE transport")
        self.controlplane = controlplane
        self.project = project
        self.template = template
        self.params = dict(params or {})
        self.client = _client_keypair(client)
        self.ttl = ttl
        self.end_on_exit = end_on_exit
        self.transport = transport
        self.session_id = session_id
        self.lanes = lanes
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            raise ProducerError("the session is not open; call open() or use a with block")
        return self._session

    def open(self) -> Session:
        """Open the session (once), or find the one ``session_id`` names, and return it."""
        if self._session is None:
            self._session = (self._existing(self.session_id) if self.session_id is not None
                             else self.controlplane.open_session(
                                 self.template, self.params, client_key=self.client.public,
                                 ttl=self.ttl, transport=self.transport, project=self.project,
                                 lanes=self.lanes))
        return self._session

    def _existing(self, session_id: str) -> Session:
        found = self.controlplane.session(session_id)
        if found.state != "open":
            raise ProducerError(f"session {session_id} is {found.state}")
        keys = {key for entry in found.config.get("sessions", [])
                for key in entry.get("client_keys", [])}
        if self.client.public.decode("ascii") not in keys:
            raise ProducerError(f"session {session_id} does not admit this producer's key "
                                f"{self.client.public.decode('ascii')}: give the key pair "
                                "registered when it was opened")
        return found

    def end(self) -> None:
        """End the session at the control plane (idempotent)."""
        self.controlplane.end_session(self.session.id)

    def gateway(self) -> GatewayTarget:
        """Where this session's streams go (of a session of several lanes, lane 0's), and how
        they authenticate."""
        return self._target(self.session.gateway)

    def gateways(self) -> list[GatewayTarget]:
        """Where each lane's streams go, lane by lane: one target for a session of one lane."""
        session = self.session
        return [self._target(gateway) for gateway in session.lanes or [session.gateway]]

    def _target(self, gateway: GatewayInfo) -> GatewayTarget:
        session, server_key = self.session, gateway.server_key.encode("ascii")
        if self.transport == "curve":
            return GatewayTarget(gateway.endpoint, server_key, self.client,
                                 receipts=gateway.receipts_endpoint)
        if gateway.plain_endpoint is None:
            raise ProducerError("the control plane names no plaintext ingress for this session")
        assert isinstance(session, OpenedSession)  # a found session streams over CURVE only
        return GatewayTarget(gateway.plain_endpoint, server_key, self.client,
                             session.plain_credentials, gateway.receipts_endpoint)

    def follow_gateway(self) -> bool:
        """Ask the control plane again where this session's streams go; True if that changed.

        Where several gateways serve a site, the control plane moves the sessions of a gateway
        whose heartbeats stopped to another: a producer whose connection failed (a send timeout,
        no receipts) calls this and streams again through ``gateway()``. What it sent to the old
        gateway that no receipt confirmed is not known to have arrived: the caller lists it."""
        current = self.controlplane.session(self.session.id)
        changed = _placement(current) != _placement(self.session)
        self._session = self.session.model_copy(update={
            "gateway": current.gateway, "gateway_name": current.gateway_name,
            "previous_gateway": current.previous_gateway, "replaced_at": current.replaced_at,
            "lanes": current.lanes})
        return changed

    def producer(self, lane: int = 0, **options: Any) -> Producer:
        """A ``Producer`` connected to the gateway of lane ``lane`` (a session of one lane has
        lane 0 only); ``options`` as for ``Producer``. Where the session has several lanes, its
        scans name their lane (``begin_scan(lane=(lane, lanes))``)."""
        target = self.gateways()[lane]
        return Producer(target.endpoint, target.server_public, target.client,
                        plain=target.plain, **options)

    def stream_synthetic(self, camera: SyntheticCamera, plan: StreamPlan, scan: int = 0,
                         **options: Any) -> StreamStats:
        """``stream_synthetic`` into this session, over each of its lanes; ``options`` as for
        that function."""
        targets = self.gateways()
        return stream_synthetic([t.endpoint for t in targets], [t.server_public for t in targets],
                                self.client, camera, plan, scan, plain=targets[0].plain,
                                **options)

    def replay_spool(self, path: Path | Sequence[Path], **options: Any) -> StreamStats:
        """``replay_spool`` into this session (of one lane); ``options`` as for that function."""
        if self.session.lanes:
            raise ProducerError("a spool is replayed as one lane: replay it into a session of "
                                "one lane")
        target = self.gateway()
        return replay_spool(path, target.endpoint, target.server_public, target.client,
                            plain=target.plain, **options)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.end_on_exit and self._session is not None:
            self.end()


class MoveWatch:
    """An ``Abandon`` for a stream into ``session``'s current gateway: the reason once the
    control plane names another gateway for the session, so that a stream stuck on a lost gateway
    ends as soon as its session has moved rather than at its send timeout. Asked from every
    producer thread, it asks the control plane at most every ``every_s``; it changes nothing in
    ``session`` (``follow_gateway`` does that)."""

    def __init__(self, session: ProducerSession, every_s: float = ABANDON_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._placement = _placement(session.session)
        self._every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._asked = float("-inf")
        self._moved_to: str | None = None

    def __call__(self) -> str | None:
        with self._lock:
            now = self._clock()
            if self._moved_to is None and now - self._asked >= self._every_s:
                self._asked = now
                self._moved_to = self._new_gateway()
        if self._moved_to is None:
            return None
        return f"the control plane moved the session to gateway {self._moved_to}"

    def _new_gateway(self) -> str | None:
        try:
            current = self._session.controlplane.session(self._session.session.id)
        except ClientError:
            return None  # it cannot say now: the stream goes on waiting
        if _placement(current) == self._placement:
            return None
        moved = [gateway for gateway in current.lanes or [current.gateway]
                 if gateway not in self._placement[1]]
        return (moved[0].name or moved[0].endpoint) if moved else current.gateway.endpoint


def _placement(session: Session) -> tuple[GatewayInfo, tuple[GatewayInfo, ...]]:
    """Where a session's streams go: lane 0's gateway, and each lane's."""
    return session.gateway, tuple(session.lanes)


def _client_keypair(client: KeyPair | Path | None) -> KeyPair:
    if client is None:
        public, secret = zmq.curve_keypair()
        return KeyPair(public, secret)
    if isinstance(client, Path):
        return load_secret_keypair(client)
    if client.secret is None:
        raise ProducerError("the client key pair has no secret key (load a .key_secret file)")
    return client
