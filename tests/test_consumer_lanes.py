"""A scan split over several lanes (gateways) is merged on the rank: opened by the first lane's
scan_begin, ended once every lane's scan_end is in, with the lanes' counts summed."""

from __future__ import annotations

import logging

import msgspec
import numpy as np
from cp_helpers import ManualClock

from common.protocol import MAX_MANIFEST, MAX_U63, Data, RoutedScanBegin, RoutedScanEnd
from dataplane import counting
from dataplane.consumer.lanes import Joined, LaneMerge, merge_ends
from dataplane.consumer.order import GatewayWatch
from dataplane.consumer.scanwork import CountingOptions, ScanWork

OPTIONS = CountingOptions(kernel=counting.count_frame, samples=3)


def _begin(lane: int | None = 0, lanes: int | None = 2, **changes: object) -> RoutedScanBegin:
    begin = RoutedScanBegin(v=1, session="s1", scan=4, scan_shape=(2, 2), frame_shape=(576, 576),
                            sectors=4, dtype="uint16", members=2, index=0, lane=lane, lanes=lanes)
    return msgspec.structs.replace(begin, **changes)


def _end(lane: int | None, lanes: int | None = 2, **changes: object) -> RoutedScanEnd:
    end = RoutedScanEnd(v=1, scan=4, expected=5, sent=10, accepted=9, dropped={"duplicate": 1},
                        drops=[(1, 2, "duplicate")], drops_truncated=False, lane=lane,
                        lanes=lanes)
    return msgspec.structs.replace(end, **changes)


def test_the_scan_ends_once_every_lane_ended_with_the_lanes_counts_summed() -> None:
    merge = LaneMerge(_begin(lane=1))
    assert merge.join(_begin(lane=0)) is Joined.JOINED
    assert merge.end(_end(0)) is None
    assert merge.waiting_for == [1]
    merged = merge.end(_end(1, expected=7, sent=20, accepted=19, dropped={"out_of_range": 2},
                            drops=[(3, 0, "out_of_range")], resumed=True))
    assert merged == RoutedScanEnd(
        v=1, scan=4, expected=12, sent=30, accepted=28,
        dropped={"duplicate": 1, "out_of_range": 2},
        drops=[(1, 2, "duplicate"), (3, 0, "out_of_range")], drops_truncated=False,
        resumed=True)


def test_an_end_of_a_lane_that_did_not_begin_or_ended_already_is_not_counted() -> None:
    merge = LaneMerge(_begin(lane=0))
    assert merge.end(_end(1)) is Joined.MISMATCH  # lane 1 never began
    assert merge.end(_end(0)) is None
    assert merge.end(_end(0)) is Joined.MISMATCH  # lane 0 ended already
    assert merge.waiting_for == [1]


def test_a_lane_that_describes_another_scan_is_not_joined() -> None:
    merge = LaneMerge(_begin(lane=0))
    assert merge.join(_begin(lane=1, lanes=3)) is Joined.MISMATCH
    assert merge.join(_begin(lane=1, scan_shape=(4, 4))) is Joined.MISMATCH
    assert merge.join(_begin(lane=None, lanes=None)) is Joined.MISMATCH
    assert merge.join(_begin(lane=0)) is Joined.REPEATED
    assert merge.end(_end(1)) is Joined.MISMATCH
    assert merge.join(_begin(lane=1)) is Joined.JOINED


def test_an_end_that_counts_lanes_differently_is_not_counted() -> None:
    merge = LaneMerge(_begin(lane=0))
    merge.join(_begin(lane=1))
    assert merge.end(_end(1, lanes=3)) is Joined.MISMATCH


def test_a_scan_of_one_lane_ends_at_its_only_end_unchanged() -> None:
    merge = LaneMerge(_begin(lane=None, lanes=None))
    end = _end(None, None)
    assert merge.end(end) is end
    assert merge.join(_begin(lane=None, lanes=None)) is Joined.REPEATED


def test_merged_manifests_and_sums_stay_within_the_protocol_bounds() -> None:
    half = [(f, 0, "duplicate") for f in range(MAX_MANIFEST // 2 + 1)]
    ends = [_end(0, drops=half, sent=MAX_U63), _end(1, drops=half, sent=MAX_U63)]
    merged = merge_ends(ends)
    assert len(merged.drops) == MAX_MANIFEST and merged.drops_truncated
    assert merged.sent == MAX_U63


def test_the_lanes_that_ended_so_far_merge_into_one_end() -> None:
    merge = LaneMerge(_begin(lane=0, lanes=3))
    assert merge.ended() is None
    merge.join(_begin(lane=1, lanes=3))
    merge.end(_end(0, lanes=3))
    assert merge.ended() == _end(0, lanes=3)
    merge.end(_end(1, lanes=3, expected=2))
    ended = merge.ended()
    assert ended is not None and (ended.expected, ended.sent) == (7, 20)
    assert merge.waiting_for == [2]


def test_a_scan_waiting_for_a_lane_is_lost_once_nothing_of_it_came_for_the_grace() -> None:
    clock = ManualClock(0.0)
    watch = GatewayWatch(lambda: None, grace_s=10, log=logging.getLogger("test"), clock=clock)
    watch.lane_ended(1)
    watch.lane_ended(2)
    clock.advance(9)
    watch.heard(2)  # another lane of scan 2 is still streaming: it waits on
    assert watch.lost([1, 2, 3]) == []
    clock.advance(1)
    assert watch.lost([1, 2, 3]) == [1]
    # Scan 2 ends (no longer held) before its grace is over: never lost.
    assert watch.lost([3]) == []
    clock.advance(100)
    assert watch.lost([2, 3]) == []


def test_a_lost_scan_keeps_its_ended_lanes_accounting_and_lists_the_rest_lane_lost() -> None:
    work = ScanWork(_begin(lane=0), OPTIONS, 2)
    sector = np.zeros(576 * 576 // 4, dtype=np.uint16)
    for frame in (0, 2):  # this rank's frames; lane 0 carries sectors 0 and 1
        for s in (0, 1):
            work.add(Data(v=1, scan=4, frame=frame, sector=s, seq=0), sector.tobytes())
    assert work.lanes.end(_end(0, expected=4, sent=8, accepted=8, dropped={}, drops=[])) is None
    closure = work.close_lost()
    assert (closure.expected, closure.received) == (4, 4)
    assert [(m.frame, m.sector, m.reason) for m in closure.missing] == [
        (f, s, "lane_lost") for f in (0, 2) for s in (2, 3)]
    # A scan none of whose lanes ended is closed as its lost gateway's.
    alone = ScanWork(_begin(lane=0), OPTIONS, 2)
    assert {m.reason for m in alone.close_lost().missing} == {"gateway_lost"}
