"""The L7 routing core, without sockets: routing, scan accounting, every drop reason."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.router as router_module
from common.config import Detector, Lane, Limits, Session
from common.protocol import (
    Data,
    NcemHeader,
    RoutedScanAbort,
    RoutedScanBegin,
    RoutedScanEnd,
    ScanBegin,
    ScanEnd,
    decode_consumer_message,
    decode_producer_header,
    encode,
    encode_ncem,
)
from common.receipts import GatewayReport
from dataplane.spool import SpoolManifest
from gateway.router import (
    Decision,
    Interruption,
    Outgoing,
    Router,
    ScanKey,
    SpoolClose,
    SpoolOpen,
    SpoolWrite,
    TableChange,
    with_spool,
)
from gateway.sessions import SessionTable

DETECTOR = Detector(frame_shape=(8, 4), sectors=2)
SECTOR = DETECTOR.sector_bytes  # 4 rows x 4 cols x 2 bytes
NOW = 1_000_000.0


def _session(sid: str = "s1", consumers: int = 2, **overrides: Any) -> Session:
    fields: dict[str, Any] = {
        "id": sid, "client_keys": [zmq.curve_keypair()[0].decode()],
        "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
        "consumers": [f"tcp://127.0.0.1:{7000 + hash(sid) % 1000 * 10 + i}"
                      for i in range(consumers)],
        "detector": DETECTOR, "limits": Limits(max_open_scans=2, max_producers=4,
                                               max_scan_positions=100)}
    fields.update(overrides)
    return Session(**fields)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _router(*sessions: Session, clock: Clock | None = None) -> Router:
    return Router(SessionTable(sessions or [_session()]), clock=clock or Clock())


def begin(scan: int = 1, shape: tuple[int, int] = (3, 4), producers: int = 1, **kw: Any) -> bytes:
    fields: dict[str, Any] = {"v": 1, "scan": scan, "scan_shape": shape, "frame_shape": (8, 4),
                              "sectors": 2, "producers": producers, "dtype": "uint16"}
    fields.update(kw)
    return encode(ScanBegin(**fields))


def data(scan: int = 1, frame: int = 0, sector: int = 0, seq: int = 0) -> bytes:
    return encode(Data(v=1, scan=scan, frame=frame, sector=sector, seq=seq))


def end(scan: int = 1, sent: int = 0) -> bytes:
    return encode(ScanEnd(v=1, scan=scan, sent=sent))


def send_data(router: Router, header: bytes, sid: str = "s1", size: int = SECTOR) -> Decision:
    return router.route(sid, header, 2, size)


def control(decision: Decision) -> list[tuple[int, Any]]:
    return [(out.slot, decode_consumer_message(out.header)) for out in decision.control]


def test_frames_go_to_member_frame_mod_n_with_the_header_unchanged() -> None:
    router = _router()
    router.route("s1", begin(), 1, 0)
    slots = [send_data(router, data(frame=f)).slot for f in range(12)]
    assert slots == [f % 2 for f in range(12)]
    assert send_data(router, data(frame=3, sector=1)).header is None


def test_scan_begin_is_routed_to_every_member_with_its_index() -> None:
    router = _router(_session(consumers=3))
    decision = router.route("s1", begin(scan=9, shape=(3, 4)), 1, 0)
    assert decision.slot == -1 and decision.drop is None
    routed = control(decision)
    assert [slot for slot, _ in routed] == [0, 1, 2]
    for index, (_, msg) in enumerate(routed):
        assert msg == RoutedScanBegin(v=1, session="s1", scan=9, scan_shape=(3, 4),
                                      frame_shape=(8, 4), sectors=2, dtype="uint16",
                                      members=3, index=index)


def test_scan_end_waits_for_every_producer_and_reports_exact_counts() -> None:
    router = _router()
    assert router.route("s1", begin(producers=2), 1, 0).control
    assert router.route("s1", begin(producers=2), 1, 0) == Decision()
    for frame in (0, 1, 2, 4):
        send_data(router, data(frame=frame))
    send_data(router, data(frame=5), size=SECTOR - 2)   # wrong payload size, owned by member 1
    send_data(router, data(frame=99))                   # out of range, owned by member 1
    assert router.route("s1", end(sent=3), 1, 0) == Decision()
    routed = control(router.route("s1", end(sent=4), 1, 0))
    expected_drops = {1: [(5, 0, "wrong_payload_size"), (99, 0, "out_of_range")], 0: []}
    dropped = {"wrong_payload_size": 1, "out_of_range": 1}
    for slot, msg in routed:
        assert isinstance(msg, RoutedScanEnd)
        assert (msg.scan, msg.sent, msg.accepted, msg.dropped) == (1, 7, 4, dropped)
        assert msg.expected == {0: 3, 1: 1}[slot]
        assert msg.drops == expected_drops[slot] and not msg.drops_truncated


def test_a_lane_of_a_scan_is_routed_with_its_lane_and_counts_only_its_producers() -> None:
    router = _router()
    # Lane 1 of 2, with two producers on this lane: the scan ends here at their second scan_end.
    routed = control(router.route("s1", begin(producers=2, lane=1, lanes=2), 1, 0))
    assert {(msg.lane, msg.lanes) for _, msg in routed} == {(1, 2)}
    # A producer of lane 0 belongs to another gateway: its scan_begin is not this scan's.
    assert router.route("s1", begin(producers=2, lane=0, lanes=2), 1, 0).drop == "scan_mismatch"
    assert router.route("s1", begin(producers=2), 1, 0).drop == "scan_mismatch"
    send_data(router, data(frame=0))
    assert router.route("s1", end(sent=1), 1, 0) == Decision()
    decision = router.route("s1", end(sent=0), 1, 0)
    ends = control(decision)
    assert [(slot, msg.expected, msg.lane, msg.lanes) for slot, msg in ends] == [
        (0, 1, 1, 2), (1, 0, 1, 2)]
    assert decision.report is not None
    assert (decision.report.lane, decision.report.lanes, decision.report.sent) == (1, 2, 1)


def test_a_scan_end_that_would_take_the_scans_sent_past_the_wire_type_is_dropped() -> None:
    router = _router()
    router.route("s1", begin(producers=3), 1, 0)
    assert router.route("s1", end(sent=2**62), 1, 0) == Decision()
    assert router.route("s1", end(sent=2**62), 1, 0).drop == "invalid_header"
    assert router.route("s1", end(sent=2**62 - 1), 1, 0) == Decision()  # the second end
    closing = router.route("s1", end(sent=0), 1, 0)
    # The consumers decode the routed scan_end (control() decodes it): its total fits.
    ends = [msg for _, msg in control(closing)]
    assert ends and all(isinstance(e, RoutedScanEnd) and e.sent == 2**63 - 1 for e in ends)
    assert closing.report is not None and closing.report.sent == 2**63 - 1


def test_manifest_is_truncated_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "MAX_MANIFEST", 2)
    router = _router(_session(consumers=1))
    router.route("s1", begin(), 1, 0)
    for frame in range(3):
        send_data(router, data(frame=frame), size=1)
    (_, msg), = control(router.route("s1", end(), 1, 0))
    assert len(msg.drops) == 2 and msg.drops_truncated and msg.dropped == {"wrong_payload_size": 3}


def test_ncem_header_is_translated_to_the_native_header() -> None:
    router = _router()
    router.route("s1", begin(scan=7, shape=(3, 4)), 1, 0)
    ncem = encode_ncem(NcemHeader(scan_number=7, frame_number=9, positions_per_row=4, rows=3,
                                  x_in_row=1, row_in_scan=2, thread_id=0, module=1))
    decision = send_data(router, ncem)
    assert decision.slot == 9 % 2
    assert decision.header == encode(Data(v=1, scan=7, frame=9, sector=1, seq=9))


def ncem(frame: int, sector: int = 0, scan: int = 7, shape: tuple[int, int] = (3, 4),
         frame_number: int | None = None) -> bytes:
    row, col = divmod(frame, shape[1])
    return encode_ncem(NcemHeader(
        scan_number=scan, frame_number=frame if frame_number is None else frame_number,
        positions_per_row=shape[1], rows=shape[0], x_in_row=col, row_in_scan=row, thread_id=0,
        module=sector))


def test_an_ncem_frame_number_that_is_not_its_position_is_dropped_and_listed() -> None:
    router = _router()
    router.route("s1", begin(scan=7, shape=(3, 4)), 1, 0)
    assert send_data(router, ncem(9, sector=1, frame_number=5)).drop == "position_mismatch"
    [(_, closed)] = control(router.route("s1", end(scan=7, sent=1), 1, 0))[1:]
    assert isinstance(closed, RoutedScanEnd) and closed.drops == [(9, 1, "position_mismatch")]


def test_ncem_data_opens_its_scan_and_closes_it_when_every_sector_arrived() -> None:
    router = _router()  # the session's detector: 2 sectors; the scan 3 x 4 positions
    first = send_data(router, ncem(0))
    assert first.opening is not None and first.slot == 0
    assert [(slot, msg.scan, msg.scan_shape, msg.index) for slot, msg in control(first.opening)] \
        == [(0, 7, (3, 4), 0), (1, 7, (3, 4), 1)]
    # Every other sector, and frame 0's first sector again (a duplicate is forwarded, once more).
    sectors = [(0, 0)] + [(f, s) for f in range(12) for s in range(2)][1:]
    decisions = [send_data(router, ncem(f, s)) for f, s in sectors]
    assert all(d.closing is None and d.slot == f % 2 for d, (f, _) in zip(decisions[:-1],
                                                                         sectors, strict=False))
    closing = decisions[-1].closing
    assert closing is not None and closing.report is not None
    assert (closing.report.closed_by, closing.report.forwarded, closing.report.lost) == (
        "complete", 25, 0)
    ends = [msg for _, msg in control(closing)]
    assert [e.expected for e in ends] == [13, 12]
    assert send_data(router, ncem(3)).drop == "scan_closed"


def test_a_gateway_carrying_one_lane_of_ncem_scans_takes_its_modules_and_closes_when_they_are_in(
        ) -> None:
    router = Router(SessionTable([_session()]), clock=Clock(), ncem_lane=Lane(lane=1, lanes=2))
    first = send_data(router, ncem(0, sector=1))
    assert first.opening is not None
    assert {(msg.lane, msg.lanes) for _, msg in control(first.opening)} == {(1, 2)}
    # Module 0 is lane 0's: dropped and listed, and it does not count toward this lane's close.
    assert send_data(router, ncem(5, sector=0)).drop == "wrong_lane"
    decisions = [send_data(router, ncem(f, sector=1)) for f in range(1, 12)]
    assert all(d.closing is None for d in decisions[:-1])
    closing = decisions[-1].closing
    assert closing is not None and closing.report is not None
    assert (closing.report.closed_by, closing.report.forwarded, closing.report.dropped,
            closing.report.lane, closing.report.lanes) == ("complete", 12, {"wrong_lane": 1}, 1, 2)
    assert {(msg.lane, msg.lanes) for _, msg in control(closing)} == {(1, 2)}


def test_a_gateway_without_lanes_refuses_a_scan_naming_them_and_says_why() -> None:
    router = Router(SessionTable([_session()]), clock=Clock(), lanes=False)
    assert router.route("s1", begin(scan=4, lane=0, lanes=2), 1, 0).drop == "no_lanes"
    assert router.refused("s1", 4) == "no_lanes"
    assert router.route("s1", begin(scan=5), 1, 0).control  # a scan of one lane opens


def test_a_session_placed_as_one_lane_admits_only_scans_of_that_lane() -> None:
    """The control plane placed lane 1 of 2 here: a producer of lane 0, or of no lane, would have
    the ranks wait for a lane no gateway carries, so it is refused and its receipt says why."""
    router = Router(SessionTable([_session(lane=Lane(lane=1, lanes=2))]), clock=Clock(),
                    lanes=False)
    for scan, lane in ((4, {"lane": 0, "lanes": 2}), (5, {}), (6, {"lane": 1, "lanes": 3})):
        assert router.route("s1", begin(scan=scan, **lane), 1, 0).drop == "wrong_lane"
        assert router.refused("s1", scan) == "wrong_lane"
    opened = router.route("s1", begin(scan=7, lane=1, lanes=2), 1, 0)
    assert {(msg.lane, msg.lanes) for _, msg in control(opened)} == {(1, 2)}


def test_ncem_scans_of_a_session_placed_as_one_lane_carry_that_lane_over_the_gateways() -> None:
    router = Router(SessionTable([_session(lane=Lane(lane=0, lanes=2))]), clock=Clock(),
                    ncem_lane=Lane(lane=1, lanes=2), lanes=False)
    first = send_data(router, ncem(0, sector=0))
    assert first.opening is not None
    assert {(msg.lane, msg.lanes) for _, msg in control(first.opening)} == {(0, 2)}
    assert send_data(router, ncem(1, sector=1)).drop == "wrong_lane"


def test_a_native_scans_lane_takes_ncem_data_of_any_module() -> None:
    """A producer that announces its lane itself and sends NCEM data headers chose its lane's
    sectors; only the gateway's own NCEM lane ties modules to lanes."""
    router = Router(SessionTable([_session()]), clock=Clock(), ncem_lane=Lane(lane=1, lanes=2))
    router.route("s1", begin(scan=7, shape=(3, 4), lane=1, lanes=2), 1, 0)
    assert send_data(router, ncem(5, sector=0)).drop is None


def test_ncem_data_of_a_session_without_consumers_opens_a_spooled_scan() -> None:
    router = _spooling()
    first = send_data(router, ncem(4, scan=1))
    assert first.opening == Decision(spool=SpoolOpen(KEY, encode(ScanBegin(
        v=1, scan=1, scan_shape=(3, 4), frame_shape=(8, 4), sectors=2, producers=1,
        dtype="uint16"))))
    assert first.spool == SpoolWrite(KEY)


def test_ncem_header_with_another_scan_shape_is_refused() -> None:
    router = _router()
    router.route("s1", begin(scan=7, shape=(3, 4)), 1, 0)
    ncem = encode_ncem(NcemHeader(scan_number=7, frame_number=0, positions_per_row=2, rows=6,
                                  x_in_row=1, row_in_scan=0, thread_id=0, module=0))
    assert send_data(router, ncem).drop == "geometry_mismatch"


def _open(router: Router) -> Router:
    router.route("s1", begin(), 1, 0)
    return router


DUPLICATE_KEY = b"\x87" + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in [
    ("v", 1), ("type", "data"), ("scan", 1), ("frame", 0), ("sector", 0), ("seq", 0), ("seq", 1)])

DROPS: list[tuple[str, list[tuple[str | None, bytes, int, int]]]] = [
    ("unauthenticated", [(None, data(), 2, SECTOR)]),
    ("unauthenticated", [("nobody", data(), 2, SECTOR)]),
    ("wrong_part_count", [("s1", data(), 3, 0)]),
    ("wrong_part_count", [("s1", data(), 1, 0)]),
    ("wrong_part_count", [("s1", begin(scan=2), 2, SECTOR)]),
    ("wrong_part_count", [("s1", end(), 2, SECTOR)]),
    ("malformed_header", [("s1", b"\xc1", 2, SECTOR)]),
    ("malformed_header", [("s1", b"", 1, 0)]),
    ("malformed_header", [("s1", b"\x81\xa4type\xa4da\xff\xfe", 2, SECTOR)]),  # bad UTF-8
    ("oversized_header", [("s1", b"\x80" + b"\x00" * 600, 2, SECTOR)]),
    ("invalid_header", [("s1", msgpack.packb({"v": 2, "type": "data"}), 2, SECTOR)]),
    ("duplicate_key", [("s1", DUPLICATE_KEY, 2, SECTOR)]),
    ("out_of_range", [("s1", data(frame=12), 2, SECTOR)]),
    ("out_of_range", [("s1", data(sector=2), 2, SECTOR)]),
    ("wrong_payload_size", [("s1", data(), 2, SECTOR + 1)]),
    ("unknown_scan", [("s1", data(scan=5), 2, SECTOR)]),
    ("unknown_scan", [("s1", end(scan=5), 1, 0)]),
    ("geometry_mismatch", [("s1", begin(scan=2, frame_shape=(8, 8)), 1, 0)]),
    ("geometry_mismatch", [("s1", begin(scan=2, sectors=4), 1, 0)]),
    ("scan_too_large", [("s1", begin(scan=2, shape=(11, 10)), 1, 0)]),
    ("too_many_producers", [("s1", begin(scan=2, producers=5), 1, 0)]),
    ("scan_mismatch", [("s1", begin(scan=1, shape=(4, 4)), 1, 0)]),
    ("too_many_scans", [("s1", begin(scan=2), 1, 0), ("s1", begin(scan=3), 1, 0)]),
    ("scan_closed", [("s1", end(), 1, 0), ("s1", data(), 2, SECTOR)]),
    ("scan_closed", [("s1", end(), 1, 0), ("s1", end(), 1, 0)]),
    ("scan_closed", [("s1", end(), 1, 0), ("s1", begin(), 1, 0)]),
]


@pytest.mark.parametrize(("reason", "messages"), DROPS, ids=[f"{r}-{i}" for i, (r, _) in
                                                                 enumerate(DROPS)])
def test_bad_messages_are_dropped_and_counted_by_reason(
        reason: str, messages: list[tuple[str | None, bytes, int, int]]) -> None:
    router = _open(_router())
    *setup, last = messages
    for message in setup:
        assert router.route(*message).drop is None
    decision = router.route(*last)
    assert decision.drop == reason and decision.slot == -1 and not decision.control
    session = last[0] or ""
    assert router.drops == {(session, reason): 1}
    assert send_data(router, data(scan=1, frame=1)).slot == 1 or reason.startswith("scan_closed")


def test_expired_session_messages_are_dropped() -> None:
    clock = Clock()
    router = _router(_session(expires_at="1970-01-12T13:46:41Z"), clock=clock)  # NOW + 1 s
    assert router.route("s1", begin(), 1, 0).control
    clock.now = NOW + 1
    assert send_data(router, data()).drop == "session_expired"
    assert router.drops == {("s1", "session_expired"): 1}


def test_scans_are_namespaced_per_session() -> None:
    router = _router(_session("a"), _session("b"))
    router.route("a", begin(scan=1), 1, 0)
    assert send_data(router, data(scan=1), sid="b").drop == "unknown_scan"
    router.route("b", begin(scan=1, shape=(2, 2)), 1, 0)
    assert send_data(router, data(scan=1, frame=11), sid="a").drop is None
    assert send_data(router, data(scan=1, frame=11), sid="b").drop == "out_of_range"
    assert {s.session: s.messages for s in router.stats()} == {"a": 1, "b": 0}


def test_member_list_is_fixed_per_scan_and_a_new_table_applies_from_the_next_scan() -> None:
    first = _session(consumers=2)
    router = _router(first)
    router.route("s1", begin(scan=1), 1, 0)
    grown = first.model_copy(update={"consumers": [*first.consumers, "tcp://127.0.0.1:6999"]})
    router.use_table(SessionTable([grown]))
    assert [send_data(router, data(frame=f)).slot for f in range(3)] == [0, 1, 0]
    assert len(control(router.route("s1", begin(scan=2), 1, 0))) == 3
    assert [send_data(router, data(scan=2, frame=f)).slot for f in range(3)] == [0, 1, 2]
    assert router.endpoints[2] == "tcp://127.0.0.1:6999"


def test_a_session_removed_from_the_table_is_forgotten_at_once() -> None:
    router = _open(_router(_session("s1"), _session("s2")))
    send_data(router, data(frame=1))
    [closed] = router.use_table(SessionTable([_session("s2")])).closed
    # Its open scan ends as its last scan_end would have ended it.
    assert [(slot, m.scan, m.expected) for slot, m in control(closed)] == [(0, 1, 0), (1, 1, 1)]
    assert send_data(router, data()).drop == "unauthenticated"
    # Its totals stay (a counter never goes down), not as a live session.
    assert [(s.session, s.live, s.messages) for s in router.stats()] == [("s2", True, 0),
                                                                         ("s1", False, 1)]


def test_ended_sessions_keep_their_totals_until_folded_together_and_series_stay_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "ENDED_SESSIONS_KEPT", 2)
    sessions = [_session(f"s{i}") for i in range(1, 5)]
    router = _router(*sessions)
    for session in sessions:
        router.route(session.id, begin(), 1, 0)
        router.route(session.id, data(frame=99), 2, SECTOR)  # out_of_range: a drop each
    for ended in range(1, 5):
        router.use_table(SessionTable(sessions[ended:]))
    stats = {s.session: s for s in router.stats()}
    assert list(stats) == ["s3", "s4", "(ended)"]
    assert not any(s.live for s in stats.values())
    assert router.drops == {("s3", "out_of_range"): 1, ("s4", "out_of_range"): 1,
                            ("(ended)", "out_of_range"): 2}


def test_the_spool_of_a_session_that_ends_mid_scan_is_published_with_what_it_holds() -> None:
    router = _spooling()
    router.route("s1", begin(), 1, 0)
    send_data(router, data(frame=0))
    change = router.use_table(SessionTable())
    [closed] = change.closed
    assert closed.spool == SpoolClose(KEY, SpoolManifest(sent=0, dropped={}, drops=[],
                                                         drops_truncated=False))
    assert closed.report is not None
    assert (closed.report.outcome, closed.report.closed_by, closed.report.spooled) == (
        "spooled", "session_end", 1)


def test_forwarded_messages_and_bytes_are_counted_per_session() -> None:
    router = _open(_router())
    for frame in range(5):
        send_data(router, data(frame=frame))
    (stats,) = router.stats()
    assert (stats.messages, stats.bytes, stats.open_scans, stats.consumers) == (5, 5 * SECTOR, 1, 2)


HEADERS = st.one_of(
    st.builds(begin, scan=st.integers(0, 3), shape=st.sampled_from([(3, 4), (2, 2), (20, 20)]),
              producers=st.integers(1, 3)),
    st.builds(data, scan=st.integers(0, 3), frame=st.integers(0, 14), sector=st.integers(0, 2)),
    st.builds(end, scan=st.integers(0, 3), sent=st.integers(0, 10)),
    st.binary(max_size=40))
MESSAGES = st.tuples(st.sampled_from(["s1", "s2", None, "zz"]), HEADERS, st.integers(1, 3),
                     st.sampled_from([SECTOR, SECTOR - 1, 0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGES, max_size=60))
def test_random_traffic_never_raises_and_every_data_message_is_accounted(
        messages: list[tuple[str | None, bytes, int, int]]) -> None:
    router = _router(_session("s1"), _session("s2", consumers=3))
    forwarded_per_scan: dict[tuple[str, int], int] = {}
    reported: dict[tuple[str, int], int] = {}
    drops = 0
    for sid, header, parts, size in messages:
        decision = router.route(sid, header, parts, size if parts == 2 else 0)
        assert (decision.slot >= 0) + (decision.drop is not None) + bool(decision.control) <= 1
        drops += decision.drop is not None
        if decision.slot >= 0:
            key = (str(sid), decode_producer_header(header).scan)
            forwarded_per_scan[key] = forwarded_per_scan.get(key, 0) + 1
        ends = [msg for _, msg in control(decision) if isinstance(msg, RoutedScanEnd)]
        if ends:
            key = (str(sid), ends[0].scan)
            accepted = forwarded_per_scan.pop(key, 0)
            assert all(msg.accepted == accepted for msg in ends)
            assert sum(msg.expected for msg in ends) == accepted
            reported[key] = reported.get(key, 0) + accepted
    assert sum(router.drops.values()) == drops
    forwarded = sum(s.messages for s in router.stats())
    assert forwarded == sum(forwarded_per_scan.values()) + sum(reported.values())


def test_without_spooling_a_session_without_consumers_refuses_scans() -> None:
    router = _router(_session(consumers=0))
    assert router.route("s1", begin(), 1, 0).drop == "no_consumers"
    assert send_data(router, data(frame=0)).drop == "unknown_scan"
    assert router.drops == {("s1", "no_consumers"): 1, ("s1", "unknown_scan"): 1}


def _spooling(*sessions: Session) -> Router:
    return Router(SessionTable(sessions or [_session(consumers=0)]), clock=Clock(), spooling=True)


KEY = ScanKey("s1", 1)


def test_a_scan_without_consumers_is_spooled_and_counted_not_dropped() -> None:
    router = _spooling()
    opened = router.route("s1", begin(producers=2), 1, 0)
    assert opened == Decision(spool=SpoolOpen(KEY, begin(producers=2)))
    assert router.route("s1", begin(producers=2), 1, 0) == Decision()
    written = Decision(spool=SpoolWrite(KEY))
    assert [send_data(router, data(frame=f)) for f in (0, 5)] == [written, written]
    header = encode_ncem(NcemHeader(scan_number=1, frame_number=9, positions_per_row=4, rows=3,
                                    x_in_row=1, row_in_scan=2, thread_id=0, module=1))
    assert send_data(router, header) == Decision(
        header=encode(Data(v=1, scan=1, frame=9, sector=1, seq=9)), spool=SpoolWrite(KEY))
    (stats,) = router.stats()
    assert (stats.spooled, stats.spooled_bytes, stats.messages, stats.open_scans) == (
        3, 3 * SECTOR, 0, 1)
    assert router.drops == {}


def test_drops_of_a_spooled_scan_go_to_the_manifest_closed_at_the_last_scan_end() -> None:
    router = _spooling()
    router.route("s1", begin(producers=2), 1, 0)
    send_data(router, data(frame=1))
    send_data(router, data(frame=99))                    # out_of_range
    send_data(router, data(frame=2), size=SECTOR - 2)    # wrong_payload_size
    assert router.route("s1", end(sent=2), 1, 0) == Decision()
    closed = router.route("s1", end(sent=1), 1, 0)
    dropped = {"out_of_range": 1, "wrong_payload_size": 1}
    drops = [(99, 0, "out_of_range"), (2, 0, "wrong_payload_size")]
    assert closed == Decision(
        spool=SpoolClose(KEY, SpoolManifest(sent=3, dropped=dropped, drops=drops,
                                            drops_truncated=False)),
        report=GatewayReport(session="s1", scan=1, outcome="spooled", reason="no_consumers",
                             closed_by="scan_end", sent=3, accepted=1, forwarded=0, spooled=1,
                             lost=2, dropped=dropped, drops=drops, drops_truncated=False,
                             spool=""))
    assert router.drops == {("s1", "out_of_range"): 1, ("s1", "wrong_payload_size"): 1}
    assert send_data(router, data(frame=0)).drop == "scan_closed"


def test_a_spooled_scan_stays_spooled_when_consumers_appear() -> None:
    empty = _session(consumers=0)
    router = _spooling(empty)
    router.route("s1", begin(scan=1), 1, 0)
    router.use_table(SessionTable([empty.model_copy(update={"consumers": ["tcp://127.0.0.1:7"]})]))
    assert send_data(router, data(frame=1)).spool == SpoolWrite(KEY)
    assert [slot for slot, _ in control(router.route("s1", begin(scan=2), 1, 0))] == [0]
    assert send_data(router, data(scan=2, frame=1)).slot == 0
    assert isinstance(router.route("s1", end(scan=1, sent=1), 1, 0).spool, SpoolClose)


def test_a_failed_spool_loses_the_rest_of_its_scan_counted() -> None:
    router = _spooling()
    router.route("s1", begin(), 1, 0)
    send_data(router, data(frame=0))
    send_data(router, data(frame=1))
    router.spool_failed(KEY, SECTOR)
    assert send_data(router, data(frame=2)).drop == "spool_failed"
    closed = router.route("s1", end(sent=3), 1, 0)
    # No spool to publish: what it was to hold is lost (``with_spool`` counts it so).
    assert closed.spool is None and closed.report is not None
    assert (closed.report.spooled, closed.report.lost) == (2, 1)
    (stats,) = router.stats()
    assert (stats.spooled, stats.spooled_bytes) == (1, SECTOR)
    assert router.drops == {("s1", "spool_failed"): 2}


def test_a_spool_that_cannot_be_opened_refuses_its_data() -> None:
    router = _spooling()
    router.route("s1", begin(), 1, 0)
    router.spool_failed(KEY, 0)
    assert send_data(router, data(frame=0)).drop == "spool_failed"
    assert router.drops == {("s1", "spool_failed"): 2}
    assert next(router.stats()).spooled == 0


def _without_member(session: Session, index: int) -> SessionTable:
    kept = [e for i, e in enumerate(session.consumers) if i != index]
    return SessionTable([session.model_copy(update={"consumers": kept})])


def _interrupted(spooling: bool) -> tuple[Router, list[Interruption]]:
    """Scan 1 of a 2-member session (3x4 positions, 2 sectors, 2 producers): frames 0-3 (both
    sectors) forwarded and one message dropped as out_of_range, then member 1 leaves."""
    session = _session(consumers=2)
    router = Router(SessionTable([session]), clock=Clock(), spooling=spooling)
    router.route("s1", begin(producers=2), 1, 0)
    router.route("s1", begin(producers=2), 1, 0)
    for frame in range(4):
        for sector in range(2):
            assert send_data(router, data(frame=frame, sector=sector)).slot == frame % 2
    send_data(router, data(frame=12))  # out_of_range
    return router, router.use_table(_without_member(session, 1)).interruptions


FORWARDED = [(f, s) for f in range(4) for s in range(2)]


def test_a_member_leaving_mid_scan_interrupts_it_every_member_is_told_and_the_rest_spooled(
        ) -> None:
    router, interruptions = _interrupted(spooling=True)
    abort = encode(RoutedScanAbort(v=1, scan=1, reason="consumer_gone"))
    assert interruptions == [Interruption(KEY, (Outgoing(0, abort), Outgoing(1, abort)),
                                          SpoolOpen(KEY, begin(producers=2)))]
    assert router.live_slots == frozenset({0})
    assert send_data(router, data(frame=4)) == Decision(spool=SpoolWrite(KEY))
    assert send_data(router, data(frame=5, sector=1)) == Decision(spool=SpoolWrite(KEY))
    assert router.route("s1", end(sent=6), 1, 0) == Decision()
    closed = router.route("s1", end(sent=5), 1, 0)
    # Every sector forwarded before the interruption is lost, one by one, member by member.
    lost = ([(12, 0, "out_of_range")]
            + [(f, s, "consumer_gone") for f, s in FORWARDED if f % 2 == 0]
            + [(f, s, "consumer_gone") for f, s in FORWARDED if f % 2 == 1])
    dropped = {"out_of_range": 1, "consumer_gone": 8}
    assert closed == Decision(
        spool=SpoolClose(KEY, SpoolManifest(sent=11, dropped=dropped, drops=lost,
                                            drops_truncated=False)),
        report=GatewayReport(session="s1", scan=1, outcome="interrupted", reason="consumer_gone",
                             closed_by="scan_end", sent=11, accepted=10, forwarded=8, spooled=2,
                             lost=9, dropped=dropped, drops=lost, drops_truncated=False,
                             spool=""))
    assert router.drops == {("s1", "out_of_range"): 1, ("s1", "consumer_gone"): 8}
    assert next(router.stats()).interrupted == 1


def test_an_interrupted_scan_without_spooling_drops_the_rest_listed_and_reports_it() -> None:
    router, interruptions = _interrupted(spooling=False)
    assert [i.spool for i in interruptions] == [None]
    assert send_data(router, data(frame=4)).drop == "consumer_gone"
    assert router.route("s1", end(sent=5), 1, 0) == Decision()
    closed = router.route("s1", end(sent=5), 1, 0)
    report = closed.report
    assert report is not None and closed.spool is None
    assert (report.sent, report.accepted, report.spooled, report.lost) == (10, 8, 0, 10)
    assert (4, 0, "consumer_gone") in report.drops
    assert router.drops[("s1", "consumer_gone")] == 9


def test_a_scan_is_interrupted_once_and_later_scans_use_the_members_left() -> None:
    router, _ = _interrupted(spooling=True)
    nobody = _session(consumers=2).model_copy(update={"consumers": []})
    assert router.use_table(SessionTable([nobody])) == TableChange([], [])
    assert router.route("s1", begin(scan=2), 1, 0) == Decision(
        spool=SpoolOpen(ScanKey("s1", 2), begin(scan=2)))


def test_a_member_leaving_between_scans_interrupts_nothing() -> None:
    session = _session(consumers=2)
    router = _router(session)
    router.route("s1", begin(), 1, 0)
    send_data(router, data(frame=0))
    router.route("s1", end(sent=1), 1, 0)
    assert router.use_table(_without_member(session, 1)) == TableChange([], [])
    assert router.drops == {}


def test_an_identical_scan_begin_again_is_a_producer_reconnecting_and_changes_nothing() -> None:
    router = _open(_router())
    send_data(router, data(frame=0))
    assert router.route("s1", begin(), 1, 0) == Decision()
    assert send_data(router, data(frame=1)).slot == 1
    [(_, closed)] = control(router.route("s1", end(sent=2), 1, 0))[1:]
    assert isinstance(closed, RoutedScanEnd) and closed.accepted == 2
    assert router.drops == {}


def test_only_scans_idle_for_scan_idle_s_are_closed_as_their_last_scan_end_would() -> None:
    clock = Clock()
    router = _router(_session(limits=Limits(max_open_scans=2, max_scan_positions=100,
                                            scan_idle_s=30)), clock=clock)
    router.route("s1", begin(scan=1, producers=2), 1, 0)
    router.route("s1", begin(scan=2), 1, 0)
    send_data(router, data(scan=1, frame=0))
    router.route("s1", end(scan=1, sent=1), 1, 0)
    clock.now += 20
    send_data(router, data(scan=2, frame=1))  # scan 2 stays busy
    clock.now += 10
    [closed] = router.expire_idle()
    assert [(slot, m.scan, m.expected, m.sent) for slot, m in control(closed)] == [
        (0, 1, 1, 1), (1, 1, 0, 1)]
    assert router.expire_idle() == []
    assert next(router.stats()).idle_closed == 1
    assert send_data(router, data(scan=1, frame=2)).drop == "scan_closed"
    clock.now += 30
    assert len(router.expire_idle()) == 1  # scan 2, idle now


def test_a_report_names_its_published_spool_or_counts_an_unpublished_one_as_lost() -> None:
    router, _ = _interrupted(spooling=True)
    send_data(router, data(frame=4))
    router.route("s1", end(sent=5), 1, 0)
    report = router.route("s1", end(sent=5), 1, 0).report
    assert report is not None and report.spooled == 1
    assert with_spool(report, "/spool/s1_scan000001.spool").spool == "/spool/s1_scan000001.spool"
    unpublished = with_spool(report, None)
    assert (unpublished.spooled, unpublished.lost, unpublished.spool) == (0, report.lost + 1, "")
    assert unpublished.dropped == {**report.dropped, "spool_failed": 1}


def test_a_broken_consumer_connection_interrupts_its_open_scans_as_a_table_change_would() -> None:
    router = _spooling(_session(consumers=2))
    router.route("s1", begin(producers=2), 1, 0)
    for frame, sector in FORWARDED:
        send_data(router, data(frame=frame, sector=sector))
    abort = encode(RoutedScanAbort(v=1, scan=1, reason="consumer_gone"))
    assert router.consumer_lost(1) == [
        Interruption(KEY, (Outgoing(0, abort), Outgoing(1, abort)),
                     SpoolOpen(KEY, begin(producers=2)))]
    assert router.consumer_lost(0) == []  # already interrupted: once only
    assert send_data(router, data(frame=4)) == Decision(spool=SpoolWrite(KEY))
    assert router.drops == {("s1", "consumer_gone"): len(FORWARDED)}


def test_while_a_consumer_is_lost_new_scans_are_spooled_until_it_is_back() -> None:
    router = _spooling(_session(consumers=2))
    router.consumer_back(0)
    router.consumer_back(1)
    assert next(router.stats()).connected == 2
    assert router.consumer_lost(1) == []  # between scans: nothing to interrupt
    assert next(router.stats()).connected == 1
    assert router.route("s1", begin(scan=2), 1, 0) == Decision(
        spool=SpoolOpen(ScanKey("s1", 2), begin(scan=2)))
    router.consumer_back(1)
    assert control(router.route("s1", begin(scan=3), 1, 0))  # routed to the members again
