"""A scan that reaches a rank through several lanes (gateways), merged into one.

A producer may split a scan over ``lanes`` gateways (``common.protocol``: ``lane``/``lanes`` in
its scan_begin). Each lane's gateway routes its share on its own connection to the rank, with its
own routed scan_begin and scan_end, and counts only what passed through it. The rank opens the
scan at the first lane's scan_begin and closes it once every lane's scan_end is in, with the
lanes' counts summed; a lane's data always precedes its own scan_end, so nothing of a lane
arrives after the merged end. Data messages need no merging: frames and sectors are the scan's.

A lane's scan_begin must describe the same scan as the first one's (shape, membership, lane
count); one that does not, or names a lane already begun, is not joined, and neither is its
scan_end: the scan then waits for the lane it lacks, as it would for a gateway that never ended
it. A lane that never ends is not waited for forever: the root closes the scan once nothing of it
has arrived for a while (``order.GatewayWatch``), keeping what the ended lanes accounted for.
"""

from __future__ import annotations

import enum

import msgspec

from common.protocol import MAX_MANIFEST, MAX_U63, VERSION, RoutedScanBegin, RoutedScanEnd


class Joined(enum.Enum):
    JOINED = "joined"
    REPEATED = "scan_begin_repeated"
    MISMATCH = "lane_mismatch"


class LaneMerge:
    """The lanes of one scan on one rank: which began, which ended."""

    def __init__(self, begin: RoutedScanBegin) -> None:
        self._first = begin
        self.lanes = begin.lanes or 1
        self._begun = {begin.lane or 0}
        self._ends: dict[int, RoutedScanEnd] = {}

    def join(self, begin: RoutedScanBegin) -> Joined:
        """A further routed scan_begin of the scan: a new lane, a repeat, or one that differs."""
        lane = begin.lane or 0
        first = self._first
        if (begin.lanes != first.lanes
                or msgspec.structs.replace(begin, lane=first.lane) != first):
            return Joined.MISMATCH
        if lane in self._begun:
            # A gateway resuming a scan after a restart announces it again: nothing changes.
            return Joined.REPEATED
        self._begun.add(lane)
        return Joined.JOINED

    def end(self, end: RoutedScanEnd) -> RoutedScanEnd | Joined | None:
        """A lane's routed scan_end: the merged end once every lane's is in, None while some are
        missing, ``Joined.MISMATCH`` for an end of a lane not begun or already ended."""
        lane = end.lane or 0
        if lane not in self._begun or lane in self._ends or (end.lanes or 1) != self.lanes:
            return Joined.MISMATCH
        self._ends[lane] = end
        return self.ended() if len(self._ends) == self.lanes else None

    def ended(self) -> RoutedScanEnd | None:
        """The lanes that ended so far, merged as one end (None: none has)."""
        return merge_ends(list(self._ends.values())) if self._ends else None

    @property
    def waiting_for(self) -> list[int]:
        """The lanes whose scan_end has not come."""
        return [lane for lane in range(self.lanes) if lane not in self._ends]


def merge_ends(ends: list[RoutedScanEnd]) -> RoutedScanEnd:
    """One routed scan_end for the whole scan: counts summed, manifests joined (bounded)."""
    if len(ends) == 1:
        return ends[0]
    dropped: dict[str, int] = {}
    for end in ends:
        for reason, count in end.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    drops = [drop for end in ends for drop in end.drops]
    # Each lane's gateway bounds its own sum of the producers' claims; the lanes' sum of those
    # is bounded here, so the merged end still fits the protocol's integers.
    return RoutedScanEnd(
        v=VERSION, scan=ends[0].scan, expected=sum(e.expected for e in ends),
        sent=min(sum(e.sent for e in ends), MAX_U63), accepted=sum(e.accepted for e in ends),
        dropped=dropped,
        drops=drops[:MAX_MANIFEST],
        drops_truncated=any(e.drops_truncated for e in ends) or len(drops) > MAX_MANIFEST,
        resumed=any(e.resumed for e in ends))
