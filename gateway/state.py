"""Sessions from the control plane's state service: the Clone-pattern client, in a thread.

Wire format and rules: ``common.clone``. The thread subscribes to updates first, then asks for
a snapshot on a fresh DEALER socket (a fresh socket per request, so a late answer to an earlier
request can never be mistaken for the current one); ``CloneState`` buffers the updates that arrive
meanwhile and applies those newer than the snapshot. A gap, a new server epoch, a heartbeat ahead of
the state, or a snapshot that does not arrive in time starts a new snapshot.

The same thread carries the gateway's reports of spooled and interrupted scans (``report``,
callable from any thread) to the service on the snapshot socket, and sends each again every
``resend_s`` and on every new socket until the service acknowledges it (the service records a
report once, so a repeat is harmless). Reports not yet acknowledged when the gateway stops are
lost with it; the spool file's trailer holds the same loss manifest.

With a ``registration`` the source also announces the gateway on the snapshot socket, at start,
on every new socket and every ``register_s``: the control plane places sessions on the gateways
whose announcements keep arriving, and hands their producers the endpoints and key announced. It
subscribes to the updates for every gateway and to those for its own key only (``common.clone``).

When the service goes silent (no heartbeat for ``missed_heartbeats`` intervals) the gateway keeps
serving its last good table — never an empty one — and keeps reconnecting and asking; ZAP and the
router still enforce each session's expiry, and this source also drops a session from the table
when its expiry time passes, with or without an update.

Control-plane replicas each run a state service that publishes the same sessions (each reads them
from the shared database). Given several, the source follows one at a time and moves on to the
next, in order and round the list, whenever the one it follows goes silent; it stays with the one
that answers. The new one's snapshot (a new epoch) replaces the table whole once complete, so a
session ended while the source was between two replicas leaves the table then; the reports not
yet acknowledged and the registration go to the new one at once.

Wiring into a gateway:
    source = CloneSessionSource([StateServer(endpoints, server_key)], gateway_keypair,
                                gateway.use_table)
    source.start()
    source.wait_synced(timeout)
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import zmq

from common import clone
from common.config import ConfigError
from common.keys import KeyPair
from common.procstat import named_thread
from common.receipts import GatewayReport
from gateway.sessions import SessionTable

log = logging.getLogger("dsn.gateway.state")


class CloneSessionSource:
    """A SessionSource fed by the state service; ``on_table`` gets every new table (own thread)."""

    def __init__(self, servers: Sequence[clone.StateServer],
                 client_keypair: KeyPair, on_table: Callable[[SessionTable], None], *,
                 heartbeat_s: float = 1.0, missed_heartbeats: int = 3,
                 clock: Callable[[], float] = time.time, poll_ms: int = 20,
                 resend_s: float = 2.0, registration: clone.Registration | None = None,
                 register_s: float = 2.0) -> None:
        if client_keypair.secret is None:
            raise ValueError("a gateway needs its secret key to authenticate")
        if not servers:
            raise ValueError("a gateway needs at least one state service to follow")
        self.servers = tuple(servers)
        self._following = 0  # index in servers
        self.resyncs = 0
        self.failovers = 0
        self.malformed = 0
        self._keypair = client_keypair
        self._on_table = on_table
        self._timeout = heartbeat_s * missed_heartbeats
        self._clock = clock
        self._poll_ms = poll_ms
        self._state = clone.CloneState()
        self._table = SessionTable()
        self._version = 0
        self._next_expiry = float("inf")
        self._context = zmq.Context()
        self._sub: zmq.Socket[bytes] | None = None
        self._dealer: zmq.Socket[bytes] | None = None
        self._asked = 0.0
        self._heard = 0.0
        self._resend_s = resend_s
        self._registration = registration
        self._register_s = register_s
        self._registered_at = 0.0
        # The service's last answer to a registration: None until one arrives.
        self.registered: clone.Registered | None = None
        self._outbox: queue.SimpleQueue[GatewayReport] = queue.SimpleQueue()
        self._report_ids = itertools.count(1)
        self._unacked: dict[int, GatewayReport] = {}
        self._sent_reports = 0.0
        self.acknowledged: dict[str, int] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread = named_thread(self._run, "dsn-state")

    @property
    def server(self) -> clone.StateServer:
        """The state service followed now."""
        return self.servers[self._following]

    def load(self) -> SessionTable:
        """The current table (the last good one while the service is away)."""
        return self._table

    def start(self) -> None:
        self._thread.start()

    def report(self, scan: GatewayReport) -> None:
        """Queue a report for the service (thread-safe; sent by this source's thread)."""
        self._outbox.put(scan)

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked) + self._outbox.qsize()

    def wait_synced(self, timeout: float) -> bool:
        """True once the first snapshot has been applied."""
        return self._synced.wait(timeout)

    def stop(self, flush_s: float = 0.0) -> None:
        """Stop, first waiting up to ``flush_s`` for unacknowledged reports to be acknowledged."""
        deadline = time.monotonic() + flush_s
        while self.unacknowledged and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(self._poll_ms / 1000)
        if self.unacknowledged:
            log.error("scan reports not acknowledged; their spool trailers hold the manifests",
                      extra={"fields": {"reports": self.unacknowledged}})
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._context.term()

    def _run(self) -> None:
        try:
            self._subscribe()
            self._resnapshot()
            while not self._stop.is_set():
                self._step()
        finally:
            for sock in (self._sub, self._dealer):
                if sock is not None:
                    sock.close(linger=0)

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket[bytes]:
        sock = self._context.socket(kind)
        sock.linger = 0
        sock.curve_serverkey = self.server.server_key
        sock.curve_publickey = self._keypair.public
        sock.curve_secretkey = self._keypair.secret
        if kind == zmq.SUB:
            sock.subscribe(clone.ALL_TOPIC)
            sock.subscribe(self._keypair.public)
        sock.connect(endpoint)
        return sock

    def _subscribe(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
        self._sub = self._socket(zmq.SUB, self.server.endpoints.updates)
        self._heard = self._clock()

    def _resnapshot(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
        self._dealer = self._socket(zmq.DEALER, self.server.endpoints.snapshot)
        self._dealer.send_multipart(clone.encode(self._state.request()))
        self._asked = self._clock()
        self._register()
        self._send_reports(list(self._unacked))

    def _register(self) -> None:
        assert self._dealer is not None
        if self._registration is None:
            return
        try:
            self._dealer.send_multipart(clone.encode(clone.Register(self._registration)),
                                        flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # the service is away; the next heartbeat tries again
        self._registered_at = self._clock()

    def _answered(self, answer: clone.Registered) -> None:
        # Every heartbeat is answered: say only what changed.
        last = self.registered
        if last is None or (last.accepted, last.reason) != (answer.accepted, answer.reason):
            if answer.accepted:
                log.info("registered with the control plane", extra={"fields": {
                    "state_service": self.server.endpoints.snapshot}})
            else:
                log.error("the control plane refused this gateway's registration",
                          extra={"fields": {"reason": answer.reason}})
        self.registered = answer

    def _send_reports(self, ids: list[int]) -> None:
        assert self._dealer is not None
        for report_id in ids:
            try:
                self._dealer.send_multipart(
                    clone.encode(clone.Report(report_id, self._unacked[report_id])),
                    flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # the service is away; the next resend tries again
        self._sent_reports = self._clock()

    def _flush_reports(self, now: float) -> None:
        fresh = []
        while not self._outbox.empty():
            report_id = next(self._report_ids)
            self._unacked[report_id] = self._outbox.get()
            fresh.append(report_id)
        if now - self._sent_reports >= self._resend_s:
            fresh = list(self._unacked)
        if fresh:
            self._send_reports(fresh)

    def _acked(self, ack: clone.Ack) -> None:
        report = self._unacked.pop(ack.report_id, None)
        if report is None:
            return
        self.acknowledged[ack.outcome] = self.acknowledged.get(ack.outcome, 0) + 1
        level = logging.INFO if ack.outcome != "refused" else logging.ERROR
        log.log(level, "scan report acknowledged", extra={"fields": {
            "session": report.session, "scan": report.scan, "outcome": ack.outcome}})

    def _step(self) -> None:
        assert self._sub is not None and self._dealer is not None
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        ready = dict(poller.poll(self._poll_ms))
        resync = False
        if self._sub in ready:
            resync |= self._drain(self._sub, snapshot=False)
        if self._dealer in ready:
            resync |= self._drain(self._dealer, snapshot=True)
        now = self._clock()
        if now - self._heard > self._timeout:
            # Silence: the service or the path to it is gone. Start over on fresh sockets; the
            # table stays as it is until a new snapshot completes.
            self._fail_over()
            self._subscribe()
            resync = True
        elif not self._state.synced and now - self._asked > self._timeout:
            resync = True
        if resync:
            self.resyncs += 1
            self._resnapshot()
        self._flush_reports(now)
        if now - self._registered_at >= self._register_s:
            self._register()
        self._refresh(now)

    def _fail_over(self) -> None:
        silent = self.server.endpoints.updates
        if len(self.servers) == 1:
            log.warning("state service silent; keeping the last good sessions",
                        extra={"fields": {"updates": silent}})
            return
        self._following = (self._following + 1) % len(self.servers)
        self.failovers += 1
        log.warning("state service silent; following the next replica, keeping the last good "
                    "sessions meanwhile", extra={"fields": {
                        "silent": silent, "following": self.server.endpoints.updates}})

    def _drain(self, sock: zmq.Socket[bytes], *, snapshot: bool) -> bool:
        """Apply every queued message; True if one of them asks for a new snapshot."""
        resync = False
        while not resync and sock.poll(0):
            try:
                frames = sock.recv_multipart()
                message = clone.decode(frames) if snapshot else clone.decode_update(frames)
            except clone.CloneError as exc:
                # A lost update shows up as a gap or a heartbeat ahead: nothing else to do here.
                self.malformed += 1
                log.warning("malformed state message", extra={"fields": {"error": str(exc)}})
                continue
            if not snapshot:
                self._heard = self._clock()
            if isinstance(message, clone.Ack):
                self._acked(message)
                continue
            if isinstance(message, clone.Registered):
                self._answered(message)
                continue
            outcome = (self._state.apply_snapshot_entry(message)
                       if snapshot and isinstance(message, clone.Entry)
                       else self._state.apply(message))
            resync = outcome is clone.Outcome.RESYNC
        return resync

    def _refresh(self, now: float) -> None:
        """Hand on a new table when the state changed or a session's expiry time passed."""
        if self._state.version == self._version and now < self._next_expiry:
            return
        self._version = self._state.version
        live = self._state.live_sessions(datetime.fromtimestamp(now, UTC))
        self._next_expiry = min((s.expires_at.timestamp() for s in live if s.expires_at),
                                default=float("inf"))
        try:
            table = SessionTable(live)
        except ConfigError as exc:
            log.error("state service sent conflicting sessions; keeping the last good table",
                      extra={"fields": {"error": str(exc)}})
            return
        self._table = table
        if self._state.synced:
            self._synced.set()
        try:
            self._on_table(table)
        except Exception:  # the consumer's failure must not stop state updates
            log.exception("on_table failed")
