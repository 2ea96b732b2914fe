"""Receipts: the gateway answers its producers what became of their scans (``common.receipts``).

The forwarding loop files each closed scan's report in a ``ReceiptBook`` (bounded: the newest
``MAX_RECEIPTS`` scans); a ``ReceiptServer`` thread answers requests on the receipts socket from
the book and from the router's open scans, so answering never slows the forwarding loop.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Final, Protocol

import zmq

from common.keys import KeyPair
from common.receipts import (
    GatewayReport,
    Receipt,
    ReceiptError,
    decode_request,
    encode,
)
from gateway.auth import ZAP_DOMAIN
from gateway.errors import SocketSetupError
from gateway.threads import SocketThread

MAX_RECEIPTS: Final = 4096
log = logging.getLogger("dsn.gateway.receipts")



class ScanStates(Protocol):
    """What the forwarding loop knows of scans still open or refused (the Router)."""

    def scan_open(self, session: str, scan: int) -> bool: ...

    def refused(self, session: str, scan: int) -> str: ...


class ReceiptBook:
    """The reports of the newest closed scans, by (session, scan); shared between threads."""

    def __init__(self, capacity: int = MAX_RECEIPTS) -> None:
        self._reports: OrderedDict[tuple[str, int], GatewayReport] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def record(self, report: GatewayReport) -> None:
        with self._lock:
            self._reports[(report.session, report.scan)] = report
            self._reports.move_to_end((report.session, report.scan))
            while len(self._reports) > self._capacity:
                self._reports.popitem(last=False)

    def get(self, session: str, scan: int) -> GatewayReport | None:
        with self._lock:
            return self._reports.get((session, scan))


def receipt(book: ReceiptBook, scans: ScanStates, session: str, scan: int) -> Receipt:
    """The answer for ``scan`` of ``session``: open, closed with its report, or unknown."""
    refused = scans.refused(session, scan)
    if scans.scan_open(session, scan):
        return Receipt(v=1, scan=scan, state="open", report=None, refused=refused)
    report = book.get(session, scan)
    if report is None:
        return Receipt(v=1, scan=scan, state="unknown", report=None, refused=refused)
    return Receipt(v=1, scan=scan, state="closed", report=report, refused=refused)


class ReceiptServer(SocketThread):
    """A thread answering receipt requests on a ROUTER bound at ``endpoint``.

    The socket is a CURVE server with the gateway's key in the ingress's ZAP domain: the ZAP
    handler admits the same producers, and names each one's session (``User-Id``), the only one
    it may ask about.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, keypair: KeyPair,
                 book: ReceiptBook, scans: ScanStates) -> None:
        self._book = book
        self._scans = scans
        socket = context.socket(zmq.ROUTER)
        socket.linger = 0
        # Room for the CURVE handshake's INITIATE command; a request itself is far smaller.
        socket.maxmsgsize = 4096
        socket.curve_server = True
        socket.curve_publickey = keypair.public
        socket.curve_secretkey = keypair.secret
        socket.zap_domain = ZAP_DOMAIN
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as exc:
            socket.close()
            raise SocketSetupError(f"gateway.receipts: cannot bind {endpoint}: {exc}") from None
        super().__init__(socket, "dsn-receipts")

    def _handle(self) -> None:
        frames = self._socket.recv_multipart(copy=False)
        if len(frames) != 2:
            return  # not a DEALER's one-frame request: nothing to answer
        identity, request = frames
        session = request.get("User-Id")
        try:
            scan = decode_request(request.bytes).scan
        except ReceiptError as exc:
            log.info("receipt request refused", extra={"fields": {
                "session": session, "error": str(exc)}})
            return
        answer = receipt(self._book, self._scans, str(session), scan)
        # A ROUTER drops an answer its peer cannot take (it left): that producer asks again.
        self._socket.send_multipart([identity.bytes, encode(answer)])
