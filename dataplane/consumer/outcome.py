"""A whole scan's result on the root rank, merged from every rank's part. Pure: no I/O, no MPI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.protocol import RoutedScanBegin, RoutedScanEnd
from common.results import COMPLETE, PARTIAL, ScanStatus
from dataplane.consumer.assembly import CONFLICTING_DUPLICATE
from dataplane.consumer.scanwork import ThresholdDecision


@dataclass(frozen=True)
class RankParts:
    """Every rank's arrays, concatenated in rank order (as a gather delivers them)."""

    frame_ids: np.ndarray  # uint32
    event_counts: np.ndarray  # int64, per frame_ids entry
    events: np.ndarray  # uint32, concatenated in frame_ids order
    incomplete_frames: np.ndarray  # uint32
    missing_frames: np.ndarray  # uint32
    lost: np.ndarray  # uint32 (n, 2): frame, sector
    lost_reasons: list[str]
    conflicts: np.ndarray  # uint32 (n, 2): frame, sector of each conflicting duplicate
    counters: list[dict[str, Any]]  # one per rank


@dataclass(frozen=True)
class ScanOutcome:
    """What the root writes and reports for one scan."""

    begin: RoutedScanBegin
    end: RoutedScanEnd
    decision: ThresholdDecision
    frame_events: np.ndarray  # object array (positions, 1) of sorted uint32 event indices
    incomplete_frames: np.ndarray
    missing_frames: np.ndarray
    lost: np.ndarray
    lost_reasons: list[str]
    conflicts: np.ndarray
    totals: dict[str, Any]

    @property
    def events(self) -> int:
        return int(sum(len(e) for e in self.frame_events[:, 0]))

    @property
    def status(self) -> ScanStatus:
        """``complete`` only when every sector arrived, no second copy contradicted the first and
        every frame could be counted."""
        nothing_missing = not len(self.lost) and not len(self.incomplete_frames)
        nothing_doubtful = not len(self.conflicts)
        everything_arrived = self.totals["unaccounted_sectors"] == 0
        if nothing_missing and nothing_doubtful and everything_arrived and self.decision.counted:
            return COMPLETE
        return PARTIAL

    def manifest(self) -> tuple[np.ndarray, list[str]]:
        """The loss manifest, in (frame, sector) order: each lost sector with why, and each
        conflicting duplicate (its sector is in the file, as first received)."""
        rows = np.concatenate([self.lost, self.conflicts]).astype(np.uint32).reshape(-1, 2)
        reasons = self.lost_reasons + [CONFLICTING_DUPLICATE] * len(self.conflicts)
        order = np.lexsort((rows[:, 1], rows[:, 0]))
        return rows[order], [reasons[i] for i in order.tolist()]

    def stream_metadata(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``/metadata/stream``: (attributes and attribute groups, datasets)."""
        attrs: dict[str, Any] = {
            "session": self.begin.session,
            "scan": self.begin.scan,
            "scan_shape": np.asarray(self.begin.scan_shape, dtype=np.int64),
            "frame_shape": np.asarray(self.begin.frame_shape, dtype=np.int64),
            "sectors": self.begin.sectors,
            "members": self.begin.members,
            "lanes": self.begin.lanes or 1,
            "status": self.status,
            "frames": self.frame_events.shape[0],
            "events": self.events,
            "incomplete_frame_count": len(self.incomplete_frames),
            "missing_frame_count": len(self.missing_frames),
            "lost_sectors": len(self.lost),
            "gateway_sent": self.end.sent,
            "gateway_accepted": self.end.accepted,
            "thresholds": self.decision.as_metadata(),
            "gateway_drops": dict(self.end.dropped),
        }
        attrs.update({k: v for k, v in self.totals.items() if k != "rejected_by_reason"})
        attrs["rejected_by_reason"] = dict(self.totals["rejected_by_reason"])
        frame_sector, reasons = self.manifest()
        datasets = {
            "incomplete_frames": self.incomplete_frames,
            "missing_frames": self.missing_frames,
            "loss_manifest/frame_sector": frame_sector,
            "loss_manifest/reason": np.array(reasons, dtype=object),
        }
        return attrs, datasets


def merge(begin: RoutedScanBegin, end: RoutedScanEnd, decision: ThresholdDecision,
          parts: RankParts) -> ScanOutcome:
    """Join the ranks' parts of one scan into the scan's outcome."""
    positions = begin.scan_shape[0] * begin.scan_shape[1]
    frame_events = _events_by_position(positions, parts)
    order = np.lexsort((parts.lost[:, 1], parts.lost[:, 0]))
    conflicts = parts.conflicts[np.lexsort((parts.conflicts[:, 1], parts.conflicts[:, 0]))]
    return ScanOutcome(
        begin=begin, end=end, decision=decision, frame_events=frame_events,
        incomplete_frames=np.sort(parts.incomplete_frames).astype(np.uint32),
        missing_frames=np.sort(parts.missing_frames).astype(np.uint32),
        lost=parts.lost[order].astype(np.uint32).reshape(-1, 2),
        lost_reasons=[parts.lost_reasons[i] for i in order.tolist()],
        conflicts=conflicts.astype(np.uint32).reshape(-1, 2), totals=_totals(parts.counters, end))


def _events_by_position(positions: int, parts: RankParts) -> np.ndarray:
    frame_events = np.empty((positions, 1), dtype=object)
    empty = np.zeros(0, dtype=np.uint32)
    for position in range(positions):
        frame_events[position, 0] = empty
    bounds = np.concatenate([[0], np.cumsum(parts.event_counts)])
    for i, frame in enumerate(parts.frame_ids.tolist()):
        frame_events[frame, 0] = parts.events[bounds[i]:bounds[i + 1]]
    return frame_events


def _totals(counters: list[dict[str, Any]], end: RoutedScanEnd) -> dict[str, Any]:
    rejected: dict[str, int] = {}
    for rank in counters:
        for reason, count in rank["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + count
    return {
        # After a gateway restart mid-scan the ranks' counts start at the restart; the
        # producers' own total is the whole scan's.
        "expected_sectors": end.sent if end.resumed else sum(c["expected"] for c in counters),
        "received_messages": sum(c["received"] for c in counters),
        "received_sectors": sum(c["stored"] for c in counters),
        "duplicate_sectors": sum(c["duplicates"] for c in counters),
        "conflicting_duplicates": sum(c["conflicting"] for c in counters),
        "rejected_sectors": sum(rejected.values()),
        "unaccounted_sectors": sum(c["unaccounted"] for c in counters),
        "drops_truncated": any(c["drops_truncated"] for c in counters),
        "rejected_by_reason": rejected,
    }
