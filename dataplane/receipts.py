"""A producer asks the gateway what became of its scan (``common.receipts``).

A stream that ended without error only says the producer's messages left its queue. The gateway's
report says what it accepted (forwarded or spooled) and what it dropped, by reason: that is what a
producer prints and judges its stream by. The receipts socket admits the producer's CURVE key (the
same key its session registered), whatever transport its data takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

import zmq

from common.keys import KeyPair
from common.receipts import (
    MAX_RECEIPT_BYTES,
    GatewayReport,
    Receipt,
    ReceiptError,
    ReceiptRequest,
    decode_receipt,
    encode,
)
from dataplane.producer import Abandon, GatewayUnresponsive, ProducerError

# How long one request may go unanswered before it is sent again.
ANSWER_TIMEOUT_S: Final = 2.0
POLL_S: Final = 0.2
DEFAULT_WAIT_S: Final = 30.0


class ReceiptClient:
    """A DEALER connected to a gateway's receipts endpoint, a CURVE client with ``client``."""

    def __init__(self, endpoint: str, server_public: bytes, client: KeyPair, *,
                 answer_timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        if client.secret is None:
            raise ProducerError("asking for receipts needs the producer's secret key")
        self.endpoint = endpoint
        self._answer_timeout_ms = int(answer_timeout_s * 1000)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        self._socket.maxmsgsize = MAX_RECEIPT_BYTES
        self._socket.curve_serverkey = server_public
        self._socket.curve_publickey = client.public
        self._socket.curve_secretkey = client.secret
        self._socket.connect(endpoint)

    def ask(self, scan: int) -> Receipt | None:
        """The gateway's answer about ``scan``, or None if none came in time."""
        self._socket.send(encode(ReceiptRequest(v=1, scan=scan)))
        while self._socket.poll(self._answer_timeout_ms):
            try:
                answer = decode_receipt(self._socket.recv())
            except ReceiptError as exc:
                raise ProducerError(f"the gateway's receipt is malformed: {exc}") from None
            if answer.scan == scan:  # an answer to an earlier, timed-out request may come late
                return answer
        return None

    def close(self) -> None:
        self._socket.close()
        self._context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def check_not_closed(client: ReceiptClient, scan: int) -> None:
    """Refuse, before anything is sent, a scan number the session has closed already: every
    message of it would be dropped as ``scan_closed``."""
    answer = client.ask(scan)
    if answer is not None and answer.state == "closed":
        raise ProducerError(f"scan {scan} of this session is closed already at the gateway "
                            "(a session uses each scan number once): stream it under a new "
                            "--scan number")


def await_report(client: ReceiptClient, scan: int, *, timeout_s: float = DEFAULT_WAIT_S,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 abandon: Abandon | None = None) -> GatewayReport:
    """The gateway's report of ``scan`` once it has closed it (every producer's scan_end in).
    ProducerError when the gateway refused the scan, or did not close it within ``timeout_s``;
    ``abandon``, asked while the gateway does not answer at all, may give up sooner
    (``producer.Abandon``)."""
    deadline = clock() + timeout_s
    last: Receipt | None = None
    while True:
        answer = client.ask(scan)
        if answer is not None:
            last = answer
            if answer.refused and answer.state != "open":
                raise ProducerError(_refused(scan, answer.refused))
            if answer.report is not None:
                return answer.report
        if clock() >= deadline:
            raise GatewayUnresponsive(_unconfirmed(client.endpoint, scan, last, timeout_s))
        # Asked only while the gateway gives no answer at all: a scan still open is waited for.
        reason = abandon() if abandon is not None and answer is None else None
        if reason is not None:
            raise GatewayUnresponsive(f"delivery of scan {scan} is not confirmed by "
                                      f"{client.endpoint}, given up: {reason}")
        sleep(POLL_S)


def _refused(scan: int, reason: str) -> str:
    hint = (": a session uses each scan number once; stream it under a new --scan number"
            if reason == "scan_closed" else "")
    return f"the gateway refused scan {scan} ({reason}){hint}"


def _unconfirmed(endpoint: str, scan: int, last: Receipt | None, timeout_s: float) -> str:
    where = (f"the gateway at {endpoint} did not answer" if last is None
             else f"scan {scan} is still {last.state} at the gateway")
    return (f"delivery of scan {scan} is not confirmed: {where} within {timeout_s:g} s "
            "(are all of the scan's producers done?)")
