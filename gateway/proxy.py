"""The gateway's socket loops: move frames, nothing else.

Ingress: a PULL socket bound at ``gateway.ingress``, CURVE server, ZAP domain "dsn" with
ZAP_ENFORCE_DOMAIN (no ZAP handler, no connection), MAXMSGSIZE = largest sector + 4 KiB so libzmq
refuses an oversized message before allocating it, and a bounded RCVHWM. With
``gateway.plain_ingress`` set (L7 only), a second PULL socket there is a PLAIN server in ZAP domain
"dsn-plain", for sessions whose policy allows unencrypted transport; the loop reads both.
Egress: one PUSH socket per consumer endpoint, connected, SNDHWM = the session's ``limits.hwm``.
The kernel sizes both sides' TCP buffers itself unless ``gateway.ingress_buffer_bytes`` /
``egress_buffer_bytes`` fix them (a hop within a site, where autotuning costs CPU per message).
A PUSH socket at its HWM blocks the loop, the loop stops reading its ingress, and the producers
block: a slow consumer slows everyone down, nothing is dropped to make room. A consumer the
session table no longer lists (its lease or its session ended) has its socket closed, delivering
what it still queues for up to ``EGRESS_LINGER_MS`` (a draining rank finishes the scans forwarded
before): a send waiting for it gives up, and the router accounts for what it was sent (its open
scans are interrupted: the members get a scan_abort, the rest is spooled, and the scan's report
goes to ``on_report`` when it ends).
A socket monitor on each egress socket tells the loop when a consumer's connection breaks (a killed
rank), in static and control-plane mode alike: its open scans are interrupted the same way, its
socket is replaced by a fresh one (what the old one still queued belongs to those scans, all
listed lost), and its session's new scans are spooled until it connects again. The loop reads
those events whenever a send waits, whenever the ingress is quiet and every
``EGRESS_CHECK_EVERY`` messages.

``l7``: every message goes through the Router (session, protocol, scan checks, routing); payload
frames are forwarded zero-copy; a scan the router spools (its session has no consumer) is written
to a file in ``gateway.spool_dir`` by this same thread (buffered, so one write call per sector).
Each closed scan's report is filed for the receipts socket (``gateway.receipts``), logged, and, for
a scan no consumer will report (spooled or interrupted), handed to ``on_report``.
``l4``: no inspection; every message goes to one PUSH socket
connected to all consumers of the single session (the comparison baseline).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import DSNConfig, GatewaySettings, Lane
from common.keys import KeyPair, load_secret_keypair
from common.procstat import named_thread, thread_cpu_seconds
from common.receipts import GatewayReport
from common.zmqparts import read_message
from gateway.auth import PLAIN_ZAP_DOMAIN, ZAP_DOMAIN, HandshakeMonitor, ZapHandler
from gateway.errors import GatewayError, ModeError, SocketSetupError
from gateway.journal import ScanJournal
from gateway.receipts import ReceiptBook, ReceiptServer
from gateway.router import (
    CLOSED_SCANS_KEPT,
    ENDED,
    Decision,
    Interruption,
    Router,
    SpoolAction,
    SpoolOpen,
    SpoolWrite,
    TableChange,
    with_spool,
)
from gateway.sessions import SessionTable, table_from_config
from gateway.spool import Spools, prepare_spool_dir

Mode = Literal["l7", "l4"]
MAXMSGSIZE_SLACK: Final = 4096
POLL_MS: Final = 100
# Long enough to flush what consumers were about to receive at shutdown, short enough to exit.
EGRESS_LINGER_MS: Final = 2000
STOP_GRACE_S: Final = 2.0
INGRESS_HWM: Final = 64
# libzmq delivers nothing to a CURVE/PLAIN + ZAP socket whose RCVHWM is 1 (measured with pyzmq
# 27): a session's hwm of 1 still gets an ingress queue of 2.
MIN_INGRESS_HWM: Final = 2
# Connection events of the egress sockets the loop acts on.
EGRESS_EVENTS: Final = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# Messages routed between two looks at those events: bounds how long a broken consumer goes
# unnoticed while the ingress is busy, at the cost of one poll per this many messages.
EGRESS_CHECK_EVERY: Final = 256
_SEND_MORE: Final = zmq.SNDMORE | zmq.NOBLOCK
# Kernel thread names: the forwarding loop's, and the prefix libzmq gives its I/O threads.
FORWARD_THREAD: Final = "dsn-forward"
IO_THREADS: Final = "ZMQbg/IO/"
_control_ids = itertools.count()
log = logging.getLogger("dsn.gateway")

ReportSink = Callable[[GatewayReport], None]
# An outgoing message: received frames passed on zero-copy, or headers the router wrote.
Parts = Sequence[zmq.Frame | bytes]


def open_ingress(context: zmq.Context[zmq.Socket[bytes]], settings: GatewaySettings,
                 table: SessionTable, keypair: KeyPair, *, rcvhwm: int = INGRESS_HWM,
                 max_sector_bytes: int = 0) -> zmq.Socket[bytes]:
    """Bind the CURVE + ZAP ingress; libzmq enforces the size limit before allocation.

    The limit is fixed at bind time: ``max_sector_bytes`` raises it for sessions that arrive later
    (control-plane mode); the router still checks each message against its own session.
    """
    socket = _ingress_socket(context, ZAP_DOMAIN, table, rcvhwm, max_sector_bytes,
                             settings.ingress_buffer_bytes)
    socket.curve_server = True
    socket.curve_publickey = keypair.public
    socket.curve_secretkey = keypair.secret
    _bind(socket, settings.ingress, "gateway.ingress")
    return socket


def open_plain_ingress(context: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                       table: SessionTable, *, rcvhwm: int = INGRESS_HWM,
                       max_sector_bytes: int = 0,
                       buffer_bytes: int | None = None) -> zmq.Socket[bytes]:
    """Bind the PLAIN + ZAP ingress (no encryption; ZAP checks the session's password)."""
    socket = _ingress_socket(context, PLAIN_ZAP_DOMAIN, table, rcvhwm, max_sector_bytes,
                             buffer_bytes)
    socket.plain_server = True
    _bind(socket, endpoint, "gateway.plain_ingress")
    return socket


def _ingress_socket(context: zmq.Context[zmq.Socket[bytes]], domain: bytes, table: SessionTable,
                    rcvhwm: int, max_sector_bytes: int,
                    buffer_bytes: int | None) -> zmq.Socket[bytes]:
    socket = context.socket(zmq.PULL)
    if buffer_bytes is not None:  # else the kernel's autotuning (gateway.ingress_buffer_bytes)
        socket.rcvbuf = buffer_bytes
    socket.linger = 0
    socket.zap_domain = domain
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    socket.maxmsgsize = max(table.max_sector_bytes, max_sector_bytes) + MAXMSGSIZE_SLACK
    socket.rcvhwm = max(rcvhwm, MIN_INGRESS_HWM)
    socket.rcvtimeo = POLL_MS
    return socket


def _bind(socket: zmq.Socket[bytes], endpoint: str, setting: str) -> None:
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        socket.close()
        raise SocketSetupError(f"{setting}: cannot bind {endpoint}: {exc}") from None


def open_egress(context: zmq.Context[zmq.Socket[bytes]], endpoints: list[str],
                hwm: int, buffer_bytes: int | None = None) -> zmq.Socket[bytes]:
    """A PUSH socket connected to ``endpoints`` (round-robin among them when several)."""
    socket = egress_socket(context, hwm, buffer_bytes)
    connect_egress(socket, endpoints)
    return socket


def egress_socket(context: zmq.Context[zmq.Socket[bytes]], hwm: int,
                  buffer_bytes: int | None = None) -> zmq.Socket[bytes]:
    """A PUSH socket toward consumers, not connected yet; ``buffer_bytes`` fixes its kernel send
    buffer (gateway.egress_buffer_bytes; None: autotuning)."""
    socket = context.socket(zmq.PUSH)
    if buffer_bytes is not None:
        socket.sndbuf = buffer_bytes
    socket.sndhwm = hwm
    socket.linger = EGRESS_LINGER_MS
    return socket


def connect_egress(socket: zmq.Socket[bytes], endpoints: list[str]) -> None:
    """Connect ``socket`` to ``endpoints``; on failure it is closed."""
    for endpoint in endpoints:
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise SocketSetupError(f"consumer {endpoint}: cannot connect: {exc}") from None


def _send_message(socket: zmq.Socket[bytes], parts: Parts) -> None:
    """send_multipart without its type check of every part on every call (these are frames or
    bytes by construction); zmq.Again when the socket is at its HWM, nothing sent then."""
    send = socket.send
    for part in parts[:-1]:
        send(part, _SEND_MORE, copy=False)
    send(parts[-1], zmq.NOBLOCK, copy=False)


def gateway_thread_cpu(pid: int | None = None) -> dict[str, float]:
    """CPU seconds so far of a gateway process's (this one's by default) forwarding loop (one
    thread: at one second per second, the process forwards all it can) and of its libzmq I/O
    threads (TCP and CURVE work, each connection on one of them)."""
    seconds = thread_cpu_seconds(pid)
    return {"forwarding": seconds.get(FORWARD_THREAD, 0.0),
            "io": sum(s for name, s in seconds.items() if name.startswith(IO_THREADS))}


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


class L7Proxy:
    """The inspecting loop: recv, ask the router, send. Owns its egress sockets, one per router
    slot (None while that consumer is not in the table)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], ingress: zmq.Socket[bytes],
                 table: SessionTable, *, clock: Callable[[], float] = time.time,
                 spools: Spools | None = None, on_report: ReportSink | None = None,
                 plain_ingress: zmq.Socket[bytes] | None = None,
                 journal: ScanJournal | None = None,
                 egress_buffer_bytes: int | None = None,
                 ncem_lane: Lane | None = None, lanes: bool = True) -> None:
        self.router = Router(table, clock=clock, spooling=spools is not None, journal=journal,
                             ncem_lane=ncem_lane, lanes=lanes)
        self.spools = spools
        self.journal = journal
        self.on_report = on_report
        self.receipts = ReceiptBook()
        self._context = context
        self._ingress = ingress
        self._plain_ingress = plain_ingress
        self._egress_buffer = egress_buffer_bytes
        # session -> (sends that waited for a consumer, seconds waited), and the send waiting now
        # (session, since): ZeroMQ shows no queue lengths, so time spent blocked is how
        # backpressure becomes visible, while it lasts too (a consumer that never takes again).
        self.backpressure: dict[str, tuple[int, float]] = {}
        self.waiting: tuple[str, float] | None = None
        self._egress: list[zmq.Socket[bytes] | None] = []
        # The monitor of each slot's egress socket (and back), and the HWM it was opened with.
        self._monitors: dict[int, zmq.Socket[bytes]] = {}
        self._monitor_slots: dict[zmq.Socket[bytes], int] = {}
        self._monitored = zmq.Poller()
        self._hwm: dict[int, int] = {}
        self._pending: SessionTable | None = None
        self._stop = threading.Event()
        self._sync_egress(table)
        if journal is not None:  # scans a previous gateway left open
            self._carry_out(self.router.restore(journal.recovered), table)

    def use_table(self, table: SessionTable) -> None:
        """Hand a new table to the loop, which adopts it before its next message (thread-safe)."""
        self._pending = table

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for slot, socket in enumerate(self._egress):
            if socket is not None:
                self._unmonitor(slot, socket)
                socket.close()
        if self.spools is not None:
            self.spools.abandon_all()
        if self.journal is not None:
            self.journal.close()

    def _sync_egress(self, table: SessionTable) -> None:
        """Connect to consumers that (re)appeared, close the sockets of those that left."""
        hwm = {endpoint: entry.session.limits.hwm
               for entry in table for endpoint in entry.session.consumers}
        live = self.router.live_slots
        self._egress.extend([None] * (len(self.router.endpoints) - len(self._egress)))
        for slot, endpoint in enumerate(self.router.endpoints):
            socket = self._egress[slot]
            if slot in live and socket is None:
                self._open_slot(slot, hwm[endpoint])
            elif slot not in live and socket is not None:
                # Its session ended or its lease did: what the socket still queues went out
                # before that, for scans the router closed or accounted for; deliver it if the
                # consumer is still there (a draining rank finishing its last scan).
                self._close_slot(slot, socket, linger_ms=EGRESS_LINGER_MS)

    def _open_slot(self, slot: int, hwm: int) -> None:
        socket = egress_socket(self._context, hwm, self._egress_buffer)
        # Monitored before it connects: a handshake completed before the monitor was attached
        # would never be reported, and the consumer never counted as connected.
        monitor = socket.get_monitor_socket(EGRESS_EVENTS)
        try:
            connect_egress(socket, [self.router.endpoints[slot]])
        except SocketSetupError:
            monitor.close(linger=0)
            raise
        self._monitors[slot] = monitor
        self._monitor_slots[monitor] = slot
        self._monitored.register(monitor, zmq.POLLIN)
        self._hwm[slot] = hwm
        self._egress[slot] = socket

    def _close_slot(self, slot: int, socket: zmq.Socket[bytes], linger_ms: int = 0) -> None:
        """Close a slot's socket (at once by default: what it still queues is accounted for by
        the router)."""
        self._unmonitor(slot, socket)
        socket.close(linger=linger_ms)
        self._egress[slot] = None

    def _unmonitor(self, slot: int, socket: zmq.Socket[bytes]) -> None:
        monitor = self._monitors.pop(slot)
        del self._monitor_slots[monitor]
        self._monitored.unregister(monitor)
        socket.disable_monitor()
        monitor.close(linger=0)

    def _check_egress(self) -> None:
        """Act on the egress connections' events: a consumer connected, or its connection
        broke."""
        for monitor, _ in self._monitored.poll(0):
            slot = self._monitor_slots[monitor]
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._consumer_lost(slot)
                    break  # the slot may have a new socket and monitor now
                self.router.consumer_back(slot)
                log.info("consumer connected", extra={"fields": {
                    "endpoint": self.router.endpoints[slot]}})

    def _consumer_lost(self, slot: int) -> None:
        interruptions = self.router.consumer_lost(slot)
        log.warning("consumer connection lost", extra={"fields": {
            "endpoint": self.router.endpoints[slot],
            "scans_interrupted": [i.key.scan for i in interruptions]}})
        if not interruptions:
            return
        # A fresh socket for the slot: a consumer restarted there must not be handed what the
        # old connection still queued for scans that are now interrupted.
        socket = self._egress[slot]
        if socket is not None:
            self._close_slot(slot, socket)
        for interruption in interruptions:
            self._interrupt(interruption)
        if socket is not None:
            self._open_slot(slot, self._hwm[slot])

    def _adopt(self) -> None:
        table, self._pending = self._pending, None
        if table is None:
            return
        self._carry_out(self.router.use_table(table), table)
        self._fold_backpressure()

    def _fold_backpressure(self) -> None:
        """Sessions whose totals the router folded into ENDED: their waits too."""
        kept = {stats.session for stats in self.router.stats()}
        for session in [s for s in self.backpressure if s not in kept and s not in ("", ENDED)]:
            waits, seconds = self.backpressure.pop(session)
            total = self.backpressure.get(ENDED, (0, 0.0))
            self.backpressure[ENDED] = (total[0] + waits, total[1] + seconds)

    def _carry_out(self, change: TableChange, table: SessionTable) -> None:
        """What the router asks of a new table (or of scans it restored): connect to the
        consumers, resume scans, interrupt those a consumer left, close those of gone sessions."""
        self._sync_egress(table)
        for decision in change.resumed:
            self._finish(decision, [], None)
        for interruption in change.interruptions:
            self._interrupt(interruption)
        for decision in change.closed:
            self._finish(decision, [], None)

    def _interrupt(self, interruption: Interruption) -> None:
        log.warning("scan interrupted: a consumer left mid-scan", extra={"fields": {
            "session": interruption.key.session, "scan": interruption.key.scan}})
        for notice in interruption.notices:
            socket = self._egress[notice.slot]
            if socket is not None:
                try:
                    # Best effort: a member that cannot take it now learns from its job's end.
                    socket.send(notice.header, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
        if interruption.spool is not None:
            self._spool(interruption.spool, None, [])

    def _receiver(self) -> Callable[[], list[zmq.Frame] | None]:
        """The next message from the ingress (or ingresses), or None after POLL_MS of quiet."""
        if self._plain_ingress is None:
            ingress = self._ingress

            def receive() -> list[zmq.Frame] | None:
                try:
                    return read_message(ingress)
                except zmq.Again:
                    return None
            return receive
        sockets = [self._ingress, self._plain_ingress]
        poller = zmq.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        turn = itertools.cycle([sockets, sockets[::-1]])

        def receive_either() -> list[zmq.Frame] | None:
            # Alternate which ingress is read first, so neither can starve the other.
            for socket in next(turn):
                try:
                    return read_message(socket, zmq.NOBLOCK)
                except zmq.Again:
                    continue
            poller.poll(POLL_MS)
            return None
        return receive_either

    def run(self) -> None:
        """Forward until stop() is called."""
        receive = self._receiver()
        route = self.router.route
        stopping = self._stop.is_set
        countdown = EGRESS_CHECK_EVERY
        while not stopping():
            frames = receive()
            # Checked after recv, so a message received after use_table() returned is judged by
            # the new table.
            if self._pending is not None:
                self._adopt()
            countdown -= 1
            if frames is None or not countdown:
                countdown = EGRESS_CHECK_EVERY
                self._check_egress()
            if frames is None:
                # Quiet ingress: the moment to close scans whose producers went silent.
                for decision in self.router.expire_idle():
                    self._finish(decision, [], None)
                continue
            head = frames[0]
            parts = len(frames)
            session = _user_id(head)
            decision = route(session, head.bytes, parts, len(frames[1]) if parts == 2 else 0)
            if decision.opening is not None:  # the scan this message opened: its scan_begins
                self._finish(decision.opening, [], session)
            if decision.slot >= 0:
                out: Parts = frames if decision.header is None else [decision.header, frames[1]]
                self._send(decision.slot, out, session)
            if decision.control or decision.spool is not None or decision.report is not None:
                self._finish(decision, frames, session)
            if decision.closing is not None:  # the scan this message completed
                self._finish(decision.closing, [], session)

    def _finish(self, decision: Decision, frames: list[zmq.Frame], session: str | None) -> None:
        """A decision's control messages, spool action and report."""
        for control in decision.control:
            self._send(control.slot, [control.header], session)
        spooled = None
        if decision.spool is not None:
            spooled = self._spool(decision.spool, decision.header, frames)
        if decision.report is not None:
            self._report(decision.report, spooled)

    def _spool(self, action: SpoolAction, header: bytes | None,
               frames: list[zmq.Frame]) -> Path | None:
        """Carry out a spool action; the published file when it closed a spool."""
        # The router asks for spooling only when the proxy has Spools.
        spools = cast(Spools, self.spools)
        if isinstance(action, SpoolWrite):
            part1 = frames[0].buffer if header is None else header
            if not spools.write(action.key, part1, frames[1].buffer):
                self.router.spool_failed(action.key, len(frames[1]))
            return None
        if isinstance(action, SpoolOpen):
            if not spools.open(action.key, action.begin):
                self.router.spool_failed(action.key, 0)
            return None
        path = spools.finish(action.key, action.manifest)
        if path is None:
            self.router.spool_failed(action.key, 0)
        return path

    def _report(self, report: GatewayReport, spool: Path | None) -> None:
        report = with_spool(report, None if spool is None else str(spool))
        self.receipts.record(report)
        forwarded = report.outcome == "forwarded"
        log.log(logging.INFO if forwarded and not report.lost else logging.WARNING,
                "scan closed", extra={"fields": {
                    "session": report.session, "scan": report.scan, "outcome": report.outcome,
                    "reason": report.reason, "closed_by": report.closed_by, "sent": report.sent,
                    "forwarded": report.forwarded, "spooled": report.spooled,
                    "lost": report.lost, "dropped": report.dropped, "spool": report.spool}})
        if not forwarded and self.on_report is not None:
            self.on_report(report)

    def _send(self, slot: int, parts: Parts, session: str | None) -> None:
        socket = self._egress[slot]
        if socket is None:
            return  # the consumer left; the router accounted for this message
        try:
            _send_message(socket, parts)
        except zmq.Again:
            self._send_when_ready(slot, socket, parts, session)

    def _send_when_ready(self, slot: int, socket: zmq.Socket[bytes], parts: Parts,
                         session: str | None) -> None:
        # Backpressure: wait for the consumer as long as it takes, but notice a stop request,
        # a new table (the consumer may have left: its lease ended) and a broken connection
        # (the consumer died): either closes the socket waited on.
        key, started = session or "", time.monotonic()
        waits, seconds = self.backpressure.get(key, (0, 0.0))
        self.backpressure[key] = (waits + 1, seconds)  # the wait shows as soon as it begins
        self.waiting = (key, started)
        try:
            while not self._stop.is_set():
                if self._pending is not None:
                    self._adopt()
                self._check_egress()
                if self._egress[slot] is not socket:
                    return
                if socket.poll(POLL_MS, zmq.POLLOUT):
                    try:
                        _send_message(socket, parts)
                        return
                    except zmq.Again:
                        continue
            self.router.undelivered(session)
        finally:
            self.waiting = None
            waits, seconds = self.backpressure.get(key, (0, 0.0))
            self.backpressure[key] = (waits, seconds + time.monotonic() - started)


class L4Proxy:
    """Plain forwarding with zmq.proxy: no inspection, no accounting."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], ingress: zmq.Socket[bytes],
                 table: SessionTable, egress_buffer_bytes: int | None = None) -> None:
        entries = list(table)
        if len(entries) != 1:
            raise ModeError(f"--mode l4 forwards one session; the configuration has {len(entries)}")
        session = entries[0].session
        self.router = None
        self._context = context
        self._ingress = ingress
        # The L7 loop's receive timeout would make zmq.proxy return EAGAIN whenever it is idle.
        ingress.rcvtimeo = -1
        self._egress = open_egress(context, list(session.consumers), session.limits.hwm,
                                   egress_buffer_bytes)
        self._control_endpoint = f"inproc://dsn-l4-control-{next(_control_ids)}"
        self._control = context.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.bind(self._control_endpoint)

    def run(self) -> None:
        """Forward until stop(); zmq.proxy returns normally only for TERMINATE."""
        while True:
            try:
                zmq.proxy_steerable(self._ingress, self._egress, None, self._control)
                return
            except zmq.Again:
                continue  # a wake-up with nothing to read (e.g. a handshake): keep forwarding

    def stop(self) -> None:
        stopper = self._context.socket(zmq.PAIR)
        stopper.linger = 0
        stopper.connect(self._control_endpoint)
        try:
            stopper.send(b"TERMINATE", flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # a previous stop() already holds the control pipe; the proxy is stopping
        finally:
            stopper.close()

    def close(self) -> None:
        self._egress.close()
        self._control.close()


class Gateway:
    """A running gateway: context, ZAP handler, ingress, and the chosen forwarding loop."""

    def __init__(self, config: DSNConfig, *, mode: Mode = "l7",
                 clock: Callable[[], float] = time.time, max_sector_bytes: int = 0,
                 on_report: ReportSink | None = None, lanes: bool = True) -> None:
        self.config = config
        # False: every session has this one gateway, and a scan naming lanes is refused.
        self.lanes = lanes
        self.max_sector_bytes = max_sector_bytes
        self.on_report = on_report
        self.mode = mode
        self.table = table_from_config(config)
        self.context = zmq.Context(io_threads=config.gateway.io_thread_count)
        self.zap = ZapHandler(self.context, self.table, clock=clock)
        self._clock = clock
        self._proxy: L7Proxy | L4Proxy | None = None
        self._receipts: ReceiptServer | None = None
        self._ingresses: list[zmq.Socket[bytes]] = []
        self._handshakes: list[HandshakeMonitor] = []
        self._stopping = threading.Event()
        self.stuck = False

    @property
    def router(self) -> Router | None:
        return self._proxy.router if self._proxy is not None else None

    def start(self) -> None:
        """Load the server key, start ZAP, bind the ingress and connect to the consumers."""
        settings = self.config.gateway
        keypair = load_secret_keypair(settings.server_secret_key_file)
        if settings.plain_ingress is not None and self.mode != "l7":
            raise ModeError("gateway.plain_ingress needs --mode l7 (it checks every message)")
        try:
            self.zap.start()
            hwm = max((e.session.limits.hwm for e in self.table), default=INGRESS_HWM)
            limits = {"rcvhwm": hwm, "max_sector_bytes": self.max_sector_bytes}
            ingress = open_ingress(self.context, settings, self.table, keypair, **limits)
            self._watch(ingress)
            plain = None
            if settings.plain_ingress is not None:
                plain = open_plain_ingress(self.context, settings.plain_ingress, self.table,
                                           buffer_bytes=settings.ingress_buffer_bytes, **limits)
                self._watch(plain)
            if self.mode == "l7":
                proxy = self._proxy = self._l7_proxy(ingress, plain)
                self._receipts = ReceiptServer(self.context, settings.receipts_endpoint, keypair,
                                               proxy.receipts, proxy.router)
                self._receipts.start()
            else:
                self._proxy = L4Proxy(self.context, ingress, self.table,
                                      settings.egress_buffer_bytes)
        except BaseException:
            self.close()
            raise

    def _watch(self, ingress: zmq.Socket[bytes]) -> None:
        self._ingresses.append(ingress)
        monitor = HandshakeMonitor(ingress)
        self._handshakes.append(monitor)
        monitor.start()

    def _l7_proxy(self, ingress: zmq.Socket[bytes], plain: zmq.Socket[bytes] | None) -> L7Proxy:
        directory = prepare_spool_dir(self.config.gateway.spool_dir)
        spools = journal = None
        if directory is not None:
            spools, journal = Spools(directory), ScanJournal(directory, CLOSED_SCANS_KEPT)
        settings = self.config.gateway
        return L7Proxy(self.context, ingress, self.table, clock=self._clock, spools=spools,
                       on_report=self.on_report, plain_ingress=plain, journal=journal,
                       egress_buffer_bytes=settings.egress_buffer_bytes,
                       ncem_lane=settings.ncem_lane, lanes=self.lanes)

    def run(self) -> None:
        """Forward until stop() is called from another thread or a signal handler."""
        if self._proxy is None:
            raise GatewayError("Gateway.run() called before start()")
        # The loop runs in its own thread: a signal may land in any thread, and Python runs its
        # handler only when the main thread executes bytecode, which zmq.proxy never returns to.
        # Named in the kernel too, so its CPU shows apart: top -H, thread_cpu().
        forward = named_thread(self._proxy.run, FORWARD_THREAD)
        forward.start()
        while forward.is_alive() and not self._stopping.is_set():
            forward.join(POLL_MS / 1000)
        # zmq.proxy (L4) sends blocking: held up by a consumer that stopped reading, it never
        # sees TERMINATE. Give it a bounded grace period, then leave it to die with the process.
        forward.join(STOP_GRACE_S)
        self.stuck = forward.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        if self._proxy is not None:
            self._proxy.stop()

    def use_table(self, table: SessionTable) -> None:
        """Serve a new set of sessions: ZAP decides new connections against it at once, the loop
        adopts it before its next message."""
        self.table = table
        self.zap.table = table
        # L4 keeps forwarding to the consumers it started with; only who may connect changes.
        if isinstance(self._proxy, L7Proxy):
            self._proxy.use_table(table)

    def close(self) -> None:
        if self.stuck:
            # Its sockets are still in use by the blocked forwarding thread; closing them or
            # terminating the context would hang. Process exit releases them.
            self.zap.stop()
            return
        if self._receipts is not None:
            self._receipts.stop()
        if self._proxy is not None:
            self._proxy.close()
        for monitor in self._handshakes:
            monitor.stop()
        for ingress in self._ingresses:
            ingress.close()
        self.zap.stop()
        self.context.term()

    def spool_files(self) -> dict[str, int]:
        """Spool files published per session (L7 with a usable spool directory only)."""
        proxy = self._proxy
        if isinstance(proxy, L7Proxy) and proxy.spools is not None:
            return proxy.spools.files.copy()
        return {}

    def auth_decisions(self) -> dict[tuple[str, str], int]:
        """Connection decisions by (decision, reason): ZAP's, and handshakes refused before ZAP."""
        decisions = Counter(self.zap.decisions.copy())
        for monitor in self._handshakes:
            decisions.update({("deny", reason): n for reason, n in monitor.failures.copy().items()})
        return dict(decisions)

    def connections(self) -> dict[str, int]:
        """Ingress TCP connections accepted and closed (every ingress)."""
        return dict(sum((Counter(m.connections.copy()) for m in self._handshakes), Counter()))

    @staticmethod
    def thread_cpu() -> dict[str, float]:
        return gateway_thread_cpu()

    def backpressure(self) -> dict[str, tuple[int, float, float]]:
        """Per session: sends that had to wait for a consumer, the seconds spent waiting, and
        how long the send waiting now has waited (0 when none is)."""
        proxy = self._proxy
        if not isinstance(proxy, L7Proxy):
            return {}
        waiting, now = proxy.waiting, time.monotonic()
        found = {session: (waits, seconds, 0.0)
                 for session, (waits, seconds) in proxy.backpressure.copy().items()}
        if waiting is not None and waiting[0] in found:
            waits, seconds, _ = found[waiting[0]]
            found[waiting[0]] = (waits, seconds + now - waiting[1], now - waiting[1])
        return found

    def counters(self) -> dict[str, object]:
        """Final or current counters, for logs (no key material)."""
        counters: dict[str, object] = {
            "auth": {f"{d}/{r}": n for (d, r), n in self.auth_decisions().items()}}
        router = self.router
        if router is not None:
            counters["sessions"] = {s.session: {"messages": s.messages, "bytes": s.bytes,
                                                "spooled": s.spooled,
                                                "spooled_bytes": s.spooled_bytes,
                                                "open_scans": s.open_scans}
                                    for s in router.stats()}
            counters["spool_files"] = self.spool_files()
            counters["drops"] = {f"{s or '-'}/{r}": n for (s, r), n in router.drops.copy().items()}
        return counters
