"""Receipts: the messages, the gateway's book of reports and its answers (no sockets here; the
whole path runs in test_no_silent_loss.py)."""

from __future__ import annotations

import msgspec
import pytest

from common.receipts import (
    GatewayReport,
    Receipt,
    ReceiptError,
    ReceiptRequest,
    decode_receipt,
    decode_request,
    encode,
)
from gateway.receipts import ReceiptBook, receipt


def report(scan: int, session: str = "s1") -> GatewayReport:
    return GatewayReport(session=session, scan=scan, outcome="forwarded", reason="",
                         closed_by="scan_end", sent=4, accepted=4, forwarded=4, spooled=0, lost=0,
                         dropped={}, drops=[], drops_truncated=False, spool="")


class Scans:
    def __init__(self, open_scans: set[tuple[str, int]], refused: dict[tuple[str, int], str]):
        self.open_scans, self.refusals = open_scans, refused

    def scan_open(self, session: str, scan: int) -> bool:
        return (session, scan) in self.open_scans

    def refused(self, session: str, scan: int) -> str:
        return self.refusals.get((session, scan), "")


def test_a_request_and_a_receipt_round_trip_and_anything_else_is_refused() -> None:
    request = ReceiptRequest(v=1, scan=3)
    assert decode_request(encode(request)) == request
    answer = Receipt(v=1, scan=3, state="closed", report=report(3), refused="")
    assert decode_receipt(encode(answer)) == answer
    for bad in [b"", b"\x00", msgspec.msgpack.encode({"v": 1, "type": "receipt_request"}),
                msgspec.msgpack.encode({"v": 2, "type": "receipt_request", "scan": 3}),
                msgspec.msgpack.encode({"v": 1, "type": "receipt_request", "scan": -1}),
                b"\x91" * 300]:
        with pytest.raises(ReceiptError):
            decode_request(bad)


def test_the_answer_says_open_closed_or_unknown_and_why_a_scan_was_refused() -> None:
    book = ReceiptBook()
    book.record(report(1))
    scans = Scans({("s1", 2)}, {("s1", 1): "scan_closed", ("s1", 9): "geometry_mismatch"})
    assert receipt(book, scans, "s1", 1) == Receipt(v=1, scan=1, state="closed",
                                                    report=report(1), refused="scan_closed")
    assert receipt(book, scans, "s1", 2).state == "open"
    assert receipt(book, scans, "s1", 9) == Receipt(v=1, scan=9, state="unknown", report=None,
                                                    refused="geometry_mismatch")
    assert receipt(book, scans, "s2", 1).state == "unknown"  # another session's scan 1


def test_the_book_keeps_the_newest_reports_only() -> None:
    book = ReceiptBook(capacity=2)
    for scan in range(3):
        book.record(report(scan))
    assert [book.get("s1", scan) for scan in range(3)] == [None, report(1), report(2)]
