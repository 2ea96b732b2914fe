"""Hostile wire messages against a running L7 gateway (real CURVE producer, real consumer PULL).

Every bad message below is sent by an admitted producer between good data messages. The gateway
must drop each one under its documented reason (Router.drops), keep forwarding, and account for
the scan exactly in the routed scan_end. Cases already proven elsewhere are not repeated here:
``test_gateway_proxy.py::test_bad_traffic_is_dropped_by_reason_and_good_traffic_still_flows``
covers a 0xc1 byte, a non-UTF-8 ``type`` value, a 600-byte header, a duplicate ``seq`` key,
3 parts, frame beyond the scan, a short payload, an unknown scan and a payload beyond MAXMSGSIZE.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import test_gateway_proxy
import zmq
from test_gateway_proxy import Rig, begin, data, end, receive
from waiting import eventually
from zmq.utils.monitor import recv_monitor_message

from common.protocol import NcemHeader, RoutedScanEnd, decode_consumer_message, encode_ncem

rig = test_gateway_proxy.rig  # the gateway rig fixture, shared

SECTOR = 144 * 576 * 2  # the 4D Camera sector the default detector geometry expects
SCAN_SHAPE = (4, 8)
NESTING = 10_000


def _header(**fields: Any) -> bytes:
    """A data header as a plain-msgpack producer would write it, with ``fields`` overriding."""
    return msgpack.packb({"v": 1, "type": "data", "scan": 1, "frame": 0, "sector": 0, "seq": 0,
                          **fields}, datetime=True)


def _pairs(pairs: list[tuple[str, Any]]) -> bytes:
    """A map written pair by pair, so a key may appear twice."""
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v)
                                                 for k, v in pairs)


def _ncem(**fields: int) -> bytes:
    values = {"scan_number": 1, "frame_number": SCAN_SHAPE[1] + 1,
              "positions_per_row": SCAN_SHAPE[1], "rows": SCAN_SHAPE[0], "x_in_row": 1,
              "row_in_scan": 1, "thread_id": 0, "module": 0}
    return encode_ncem(NcemHeader(**(values | fields)))


PAYLOAD = b"\x00" * SECTOR
GOOD = _header()
NON_UTF8_KEY = bytes([0x86, 0xA2, 0xFF, 0xFE]) + GOOD[3:]  # "v" (a1 76) replaced by 2 bad bytes

# (case, message parts, drop reason, counted in the scan's own manifest too)
CASES: list[tuple[str, list[bytes], str, bool]] = [
    ("truncated header", [GOOD[:-3], PAYLOAD], "malformed_header", False),
    ("header cut after the map marker", [GOOD[:1], PAYLOAD], "malformed_header", False),
    (f"{NESTING} nested arrays", [b"\x91" * NESTING + b"\x00", PAYLOAD], "oversized_header", False),
    (f"{NESTING} nested maps", [b"\x81\xa1k" * NESTING + b"\x00", PAYLOAD], "oversized_header",
     False),
    ("150 nested maps within the size limit", [b"\x81\xa1k" * 150 + b"\x00", PAYLOAD],
     "invalid_header", False),
    ("500 nested arrays within the size limit", [b"\x91" * 500 + b"\x00", PAYLOAD],
     "invalid_header", False),
    ("duplicate sent in scan_end", [_pairs([("v", 1), ("type", "scan_end"), ("scan", 1),
                                            ("sent", 1), ("sent", 10**6)])], "duplicate_key",
     False),
    ("duplicate frame in data", [_pairs([("v", 1), ("type", "data"), ("scan", 1), ("frame", 0),
                                         ("sector", 0), ("seq", 0), ("frame", 1)]), PAYLOAD],
     "duplicate_key", False),
    ("extension type as frame", [_header(frame=msgpack.ExtType(5, b"\x00" * 4)), PAYLOAD],
     "invalid_header", False),
    ("timestamp as frame", [_header(frame=msgpack.Timestamp(1, 0)), PAYLOAD], "invalid_header",
     False),
    ("datetime as scan", [_header(scan=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)),
                          PAYLOAD], "invalid_header", False),
    ("negative frame", [_header(frame=-1), PAYLOAD], "invalid_header", False),
    ("seq 2**64 - 1", [_header(seq=2**64 - 1), PAYLOAD], "invalid_header", False),
    ("scan 2**32", [_header(scan=2**32), PAYLOAD], "invalid_header", False),
    ("float field", [_header(sector=0.0), PAYLOAD], "invalid_header", False),
    ("non-UTF-8 key", [NON_UTF8_KEY, PAYLOAD], "malformed_header", False),
    ("sector == sectors", [_header(sector=4), PAYLOAD], "out_of_range", True),
    ("NCEM module == sectors", [_ncem(module=4), PAYLOAD], "out_of_range", True),
    ("NCEM frame_number that is not its x, y", [_ncem(frame_number=0), PAYLOAD],
     "position_mismatch", True),
    ("NCEM header of another scan shape", [_ncem(positions_per_row=SCAN_SHAPE[1] + 1), PAYLOAD],
     "geometry_mismatch", True),
    ("NCEM header with a non-UTF-8 string", [b"\x98\xa2\xff\xfe" + b"\x00" * 7, PAYLOAD],
     "invalid_header", False),
    ("one empty part", [b""], "malformed_header", False),
    ("two empty parts", [b"", b""], "malformed_header", False),
    ("empty payload", [GOOD, b""], "wrong_payload_size", True),
    ("data header without payload", [GOOD], "wrong_part_count", True),
    ("scan_begin with a payload", [begin(scan=1, shape=SCAN_SHAPE, frame_shape=(576, 576),
                                         sectors=4)[0], PAYLOAD], "wrong_part_count", False),
    ("10 parts", [GOOD, *[PAYLOAD] * 9], "wrong_part_count", False),
    ("10 empty parts", [b""] * 10, "wrong_part_count", False),
]


def _scan_begin() -> list[bytes]:
    return begin(scan=1, shape=SCAN_SHAPE, frame_shape=(576, 576), sectors=4)


def _good(frame: int) -> list[bytes]:
    return data(1, frame, 1, seq=frame, size=SECTOR)


@pytest.mark.timeout(30)
def test_each_hostile_message_is_dropped_by_reason_and_interleaved_good_data_arrives_intact(
        rig: Callable[..., Rig]) -> None:
    assert len(CASES) <= SCAN_SHAPE[0] * SCAN_SHAPE[1], "one good frame per case"
    r = rig(consumers=1, detector={})
    router, consumer, producer = r.gateway.router, r.consumers[0], r.producer()
    assert router is not None
    producer.send_multipart(_scan_begin())
    receive(consumer, 1)
    expected: Counter[tuple[str, str]] = Counter()
    in_scan: Counter[str] = Counter()
    for frame, (case, message, reason, counted_in_scan) in enumerate(CASES):
        producer.send_multipart(message)
        good = _good(frame)
        producer.send_multipart(good)
        # One connection keeps its order: the good message arriving means the bad one was judged.
        [(header, payload)] = receive(consumer, 1)
        assert (header, payload) == (good[0], good[1]), case
        expected[("s1", reason)] += 1
        in_scan[reason] += counted_in_scan
        assert router.drops == dict(expected), case
    producer.send_multipart(end(scan=1, sent=len(CASES)))
    [(last,)] = receive(consumer, 1)
    routed_end = decode_consumer_message(last)
    assert isinstance(routed_end, RoutedScanEnd)
    assert (routed_end.expected, routed_end.accepted) == (len(CASES), len(CASES))
    assert routed_end.dropped == {k: v for k, v in in_scan.items() if v}
    assert r.gateway.counters()["sessions"]["s1"]["messages"] == len(CASES)  # type: ignore[index]


def _disconnected(monitor: zmq.Socket) -> bool:
    """Whether the monitored socket has lost a connection (since the last call)."""
    while monitor.poll(0):
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("part", ["header", "payload"])
def test_a_part_beyond_maxmsgsize_closes_only_its_connection_and_is_never_routed(
        rig: Callable[..., Rig], part: str) -> None:
    r = rig(consumers=1, detector={})
    router, consumer, producer = r.gateway.router, r.consumers[0], r.producer()
    assert router is not None
    producer.send_multipart(_scan_begin())
    receive(consumer, 1)
    hostile = r.producer()
    monitor = hostile.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        huge = b"\x91" * (2 * SECTOR) + b"\x00"
        hostile.send_multipart([huge, PAYLOAD] if part == "header" else [GOOD, PAYLOAD + huge])
        eventually(lambda: _disconnected(monitor), timeout_s=5.0,
                   what="the gateway to close the connection of an oversized message")
    finally:
        hostile.disable_monitor()
        monitor.close(linger=0)
    good = _good(0)
    producer.send_multipart(good)
    assert receive(consumer, 1) == [good]
    assert router.drops == {}  # libzmq refused it before the router could see it
