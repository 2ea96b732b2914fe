"""Who may connect: the ZAP admission policy (pure) and the thread that serves it.

The ingress socket sets ``zap_domain=b"dsn"`` and ``ZAP_ENFORCE_DOMAIN=1``: libzmq then refuses
every connection unless this handler, bound at ``common.zap.ENDPOINT`` on the same context, answers
200. With no handler running, nothing connects (fail closed). Request and reply frames:
``common.zap``.

Two domains, one per ingress: ``dsn`` (the CURVE ingress) admits only CURVE, ``dsn-plain`` (the
optional plaintext ingress) only PLAIN, with username = a session id whose session allows
unencrypted transport and password = the secret whose SHA-256 that session publishes.
The user id of an admitted connection is its session id; libzmq attaches it to every message from
that connection as the ``User-Id`` property, which the router checks per message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from common import zap
from common.logs import fields
from common.procstat import named_thread
from gateway.sessions import SessionEntry, SessionTable
from gateway.threads import POLL_MS, SocketThread

ZAP_DOMAIN: Final = b"dsn"
PLAIN_ZAP_DOMAIN: Final = b"dsn-plain"

log = logging.getLogger("dsn.gateway.auth")


@dataclass(frozen=True, slots=True)
class Admission:
    """A ZAP decision: ``user_id`` (the session id) when allowed, ``reason`` when denied."""

    allowed: bool
    user_id: str = ""
    reason: str = ""

    @property
    def label(self) -> str:
        return "allow" if self.allowed else "deny"


def _deny(reason: str) -> Admission:
    return Admission(False, reason=reason)


def admit(table: SessionTable, mechanism: str, client_key_z85: str, peer_address: str,
          now: float) -> Admission:
    """Admit a CURVE client whose key belongs to a live session reachable from ``peer_address``."""
    if mechanism != "CURVE":
        return _deny("mechanism")
    return _admit_entry(table.by_key(client_key_z85), peer_address, now)


def _admit_entry(entry: SessionEntry | None, peer_address: str, now: float) -> Admission:
    if entry is None:
        return _deny("unknown_key")
    if not entry.admits(peer_address):
        return _deny("network")
    if entry.expired(now):
        return _deny("expired")
    return Admission(True, user_id=entry.id, reason="session")


def admit_plain(table: SessionTable, username: bytes, password: bytes, peer_address: str,
                now: float) -> Admission:
    """Admit a PLAIN client naming a live session that allows unencrypted transport, with the
    password whose SHA-256 the session publishes, from one of its networks."""
    entry = table.by_id(username.decode("ascii", "replace"))
    expected = entry.session.plain_password_sha256 if entry is not None else None
    if entry is None or expected is None:
        return _deny("unknown_key")
    # Compared in constant time; the password itself is never stored or logged.
    if not hmac.compare_digest(hashlib.sha256(password).hexdigest(), expected):
        return _deny("bad_password")
    return _admit_entry(entry, peer_address, now)


def decide_request(table: SessionTable, request: zap.ZapRequest, now: float) -> Admission:
    """Turn a ZAP request into an admission decision; anything unexpected is denied."""
    if request.domain == ZAP_DOMAIN:
        if request.mechanism != b"CURVE":
            return _deny("mechanism")
        key = request.curve_key()
        if key is None:
            return _deny("bad_request")
        return admit(table, "CURVE", key, request.address, now)
    if request.domain == PLAIN_ZAP_DOMAIN:
        if request.mechanism != b"PLAIN":
            return _deny("mechanism")
        credentials = request.plain_credentials()
        if credentials is None:
            return _deny("bad_request")
        username, password = credentials
        return admit_plain(table, username, password, request.address, now)
    return _deny("domain")


def reply_frames(request_id: bytes, admission: Admission) -> list[bytes]:
    if admission.allowed:
        return zap.allow(request_id, admission.user_id)
    return zap.deny(request_id, admission.reason)


class ZapHandler:
    """Answers ZAP requests for one context from a thread; counts every decision.

    ``table`` may be replaced at any time (one attribute assignment); each request is decided
    against whichever table was current when it arrived.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], table: SessionTable, *,
                 clock: Callable[[], float] = time.time, poll_ms: int = 100) -> None:
        self.table = table
        self.decisions: dict[tuple[str, str], int] = {}
        self._context = context
        self._clock = clock
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = named_thread(self._serve, "dsn-zap")

    def start(self) -> None:
        """Bind the handler and return once it is answering (raises if the bind failed)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _serve(self) -> None:
        try:
            socket = self._context.socket(zmq.REP)
            socket.linger = 0
            socket.bind(zap.ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if socket.poll(self._poll_ms):
                    self._answer(socket)
        finally:
            socket.close()

    def _answer(self, socket: zmq.Socket[bytes]) -> None:
        frames = socket.recv_multipart()
        try:
            request = zap.parse(frames)
        except zap.ZapError as exc:
            self._reply(socket, exc.request_id, exc.address, _deny("bad_request"))
            return
        admission = decide_request(self.table, request, self._clock())
        self._reply(socket, request.request_id, request.address, admission)

    def _reply(self, socket: zmq.Socket[bytes], request_id: bytes, address: str,
               admission: Admission) -> None:
        label = (admission.label, admission.reason)
        self.decisions[label] = self.decisions.get(label, 0) + 1
        if not admission.allowed:
            # The peer address and reason help an operator; the client key is never logged.
            log.info("connection refused", extra={"fields": {"reason": admission.reason,
                                                             "peer": address}})
        socket.send_multipart(reply_frames(request_id, admission))


HANDSHAKE_EVENTS: Final = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
# Connections that never speak ZMTP (a port scanner, garbage) produce only these two.
CONNECTION_EVENTS: Final[dict[int, str]] = {zmq.EVENT_ACCEPTED: "accepted",
                                            zmq.EVENT_DISCONNECTED: "disconnected"}
_PROTOCOL_REASONS: Final[dict[int, str]] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "handshake_mechanism",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "handshake_cryptographic",
}


def handshake_failure_reason(event: int, value: int) -> str:
    """Label for a connection refused before ZAP was asked (NULL/PLAIN client, wrong server key)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _PROTOCOL_REASONS.get(value, "handshake_protocol")
    return "handshake_failed"


def _log_handshake_refusal(reason: str, endpoint: bytes, count: int) -> None:
    """Log the ``count``-th refusal for ``reason`` if ``count`` is a power of two.

    Powers of two rather than a token bucket: a flood of a million refusals costs twenty lines,
    and each line carries the running count, so the log still tells how big the flood was.
    ``endpoint`` is what libzmq's monitor event names: for a listening socket that is the socket's
    own endpoint, never the peer (the peer's address reaches only ZAP, which logs it).
    """
    if count & (count - 1):
        return
    log.info("connection refused", extra=fields(
        reason=reason, endpoint=endpoint.decode("utf-8", "replace"), count=count))


class HandshakeMonitor(SocketThread):
    """Counts and logs ingress handshakes that failed before reaching ZAP, from a socket-monitor
    thread.

    A client speaking NULL or PLAIN to the CURVE ingress, or holding the wrong server key, is
    refused by libzmq itself; only the monitor sees it. ``connections`` counts every TCP connection
    accepted and closed, so connections that never got as far as a handshake show too.
    """

    def __init__(self, ingress: zmq.Socket[bytes], *, poll_ms: int = POLL_MS) -> None:
        self.failures: dict[str, int] = {}
        self.connections: dict[str, int] = {}
        self._ingress = ingress
        mask = HANDSHAKE_EVENTS
        for event in CONNECTION_EVENTS:
            mask |= event
        super().__init__(ingress.get_monitor_socket(mask), "dsn-handshakes", poll_ms=poll_ms)

    def _close(self) -> None:
        self._ingress.disable_monitor()
        super()._close()

    def _handle(self) -> None:
        event = recv_monitor_message(self._socket)
        connection = CONNECTION_EVENTS.get(event["event"])
        if connection is not None:
            self.connections[connection] = self.connections.get(connection, 0) + 1
            return
        reason = handshake_failure_reason(event["event"], event["value"])
        count = self.failures.get(reason, 0) + 1
        self.failures[reason] = count
        _log_handshake_refusal(reason, event["endpoint"], count)
