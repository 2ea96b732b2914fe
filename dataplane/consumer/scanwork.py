"""One rank's work on one scan: assemble, sample, count, and account. Pure: no I/O, no MPI.

Thresholds are agreed once per scan across ranks (see ``agreement``). Until they are known, complete
frames wait in memory; the first ``quota`` of them are also this rank's samples. The rank's
contribution to the agreement is a packed vector (``pack_contribution``): the histogram of its
sample frames, or, when it has no complete frame at all, the histogram of the sectors it did
receive, so the job can still choose thresholds if no rank completed a single frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from common.protocol import VERSION, Data, RoutedScanBegin, RoutedScanEnd
from dataplane import counting
from dataplane.consumer.assembly import (
    GATEWAY_LOST,
    LANE_LOST,
    NOT_RECEIVED,
    ScanAssembly,
    ScanClosure,
)
from dataplane.consumer.lanes import LaneMerge

HISTOGRAM_BINS = counting.PIXEL_VALUES


@dataclass(frozen=True)
class CountingOptions:
    """How every rank counts: the same on all ranks of a job."""

    kernel: counting.Kernel
    dark: np.ndarray | None = None  # in counting.dark_offsets form, frame-shaped
    samples: int = 40
    background_n_sigma: float = 4.0
    xray_n_sigma: float = 10.0

    def quota(self, ranks: int) -> int:
        """Sample frames each rank contributes: the job's samples spread over its ranks."""
        return max(1, math.ceil(self.samples / ranks))


@dataclass(frozen=True)
class ThresholdDecision:
    """The thresholds all ranks use for one scan, and what they were computed from."""

    thresholds: counting.Thresholds | None
    # "frames"; "sectors" when no rank had a complete frame to sample; "none" when no rank received
    # a pixel; "failed" when the samples do not determine thresholds (``error`` says why).
    source: str
    samples: int
    error: str = ""

    @property
    def counted(self) -> bool:
        return self.thresholds is not None

    def as_metadata(self) -> dict[str, Any]:
        base: dict[str, Any] = {"source": self.source, "samples": self.samples}
        if self.error:
            base["error"] = self.error
        if self.thresholds is not None:
            base.update(self.thresholds.as_metadata())
        return base


def pack_contribution(frame_hist: np.ndarray, n_frames: int,
                      sector_hist: np.ndarray, n_sectors: int) -> np.ndarray:
    """One rank's vector for the element-wise sum across ranks."""
    return np.concatenate([frame_hist.astype(np.int64), sector_hist.astype(np.int64),
                           np.array([n_frames, n_sectors], dtype=np.int64)])


def decide_thresholds(total: np.ndarray, background_n_sigma: float,
                      xray_n_sigma: float) -> ThresholdDecision:
    """Thresholds from the summed contributions of all ranks (run on the root rank)."""
    frame_hist, sector_hist = total[:HISTOGRAM_BINS], total[HISTOGRAM_BINS:2 * HISTOGRAM_BINS]
    n_frames, n_sectors = int(total[-2]), int(total[-1])
    if n_frames:
        hist, n_samples, source = frame_hist, n_frames, "frames"
    elif n_sectors:
        hist, n_samples, source = sector_hist, n_sectors, "sectors"
    else:
        return ThresholdDecision(None, "none", 0, "no rank received any pixel of the scan")
    try:
        thresholds = counting.thresholds_from_histogram(
            hist, n_samples, background_n_sigma=background_n_sigma, xray_n_sigma=xray_n_sigma)
    except counting.CountingError as exc:
        # Every rank waits for this decision, so a failure is decided and shared, never raised.
        return ThresholdDecision(None, "failed", n_samples, str(exc))
    return ThresholdDecision(thresholds, source, n_samples)


@dataclass(frozen=True)
class RankScanResult:
    """What one rank sends to the root for one scan."""

    scan: int
    frame_ids: np.ndarray  # uint32, every frame this rank owns, sorted
    event_counts: np.ndarray  # int64, per frame_ids entry
    events: np.ndarray  # uint32, the frames' events concatenated in frame_ids order
    closure: ScanClosure
    counters: dict[str, Any]


class ScanWork:
    """Assembly, sampling and counting state of one scan on one rank."""

    def __init__(self, begin: RoutedScanBegin, options: CountingOptions, ranks: int) -> None:
        self.session = begin.session
        self.scan = begin.scan
        self.begin = begin
        self.assembly = ScanAssembly(begin)
        self.lanes = LaneMerge(begin)
        self.options = options
        self.decision: ThresholdDecision | None = None
        self.closure: ScanClosure | None = None
        self.end: RoutedScanEnd | None = None
        self.contributed = False
        self._quota = options.quota(ranks)
        self._samples: list[np.ndarray] = []
        self._waiting: list[tuple[int, np.ndarray]] = []
        self._events: dict[int, np.ndarray] = {}

    @property
    def ready_to_contribute(self) -> bool:
        enough = len(self._samples) >= self._quota or self.closure is not None
        return enough and not self.contributed

    @property
    def finished(self) -> bool:
        """Ended, thresholds known, and every owned frame counted."""
        return self.closure is not None and self.decision is not None

    @property
    def counted_frames(self) -> int:
        return len(self._events)

    def add(self, msg: Data, payload: bytes | memoryview) -> None:
        pixels = self.assembly.add(msg, payload)
        if pixels is None:
            return
        if not self.contributed and len(self._samples) < self._quota:
            self._samples.append(pixels)
        if self.decision is not None:
            self._count(self.decision, msg.frame, pixels)
        else:
            self._waiting.append((msg.frame, pixels))

    def contribution(self) -> np.ndarray:
        """This rank's packed histogram vector; the samples are released."""
        dark = self.options.dark
        frame_hist = counting.sample_histogram(self._samples, dark) if self._samples else _empty()
        sector_hist, n_sectors = _empty(), 0
        if not self._samples:
            sector_hist, n_sectors = self._sector_histogram()
        vector = pack_contribution(frame_hist, len(self._samples), sector_hist, n_sectors)
        self._samples = []
        self.contributed = True
        return vector

    def decide(self, decision: ThresholdDecision) -> None:
        """Thresholds are known: count every frame that waited for them."""
        self.decision = decision
        waiting, self._waiting = self._waiting, []
        for frame, pixels in waiting:
            self._count(decision, frame, pixels)
        if self.closure is not None:
            self._count_incomplete(decision)

    def close(self, end: RoutedScanEnd, missing_reason: str = NOT_RECEIVED) -> ScanClosure:
        self.end = end
        self.closure = self.assembly.close(end, missing_reason)
        if self.decision is not None:
            self._count_incomplete(self.decision)
        return self.closure

    def close_lost(self) -> ScanClosure:
        """Close a scan whose gateway was lost, as its routed ``scan_end`` would have: what the
        gateway forwarded is known only as far as it arrived, no producer's count reached it,
        and every sector that never came is listed ``gateway_lost``. A scan split over lanes some
        of which ended keeps their accounting, and lists what never came ``lane_lost``."""
        received = self.assembly.counters.received
        ended = self.lanes.ended()
        if ended is not None:
            return self.close(msgspec.structs.replace(ended, expected=max(ended.expected,
                                                                          received)), LANE_LOST)
        return self.close(RoutedScanEnd(v=VERSION, scan=self.scan, expected=received, sent=0,
                                        accepted=0, dropped={}, drops=[], drops_truncated=False),
                          GATEWAY_LOST)

    def result(self) -> RankScanResult:
        if self.closure is None or self.end is None or self.decision is None:
            raise RuntimeError(f"scan {self.scan} is not finished")
        frame_ids = np.array(sorted(self._events), dtype=np.uint32)
        per_frame = [self._events[f] for f in frame_ids.tolist()]
        counts = np.array([len(e) for e in per_frame], dtype=np.int64)
        events = np.concatenate(per_frame).astype(np.uint32) if per_frame else _no_events()
        counters = self.assembly.counters
        return RankScanResult(
            scan=self.scan, frame_ids=frame_ids, event_counts=counts, events=events,
            closure=self.closure,
            counters={"expected": self.closure.expected, "received": counters.received,
                      "stored": counters.stored, "duplicates": counters.duplicates,
                      "conflicting": counters.conflicting, "rejected": dict(counters.rejected),
                      "unaccounted": self.closure.unaccounted,
                      "drops_truncated": self.end.drops_truncated})

    def _count(self, decision: ThresholdDecision, frame: int, pixels: np.ndarray) -> None:
        if decision.thresholds is None:
            # Without thresholds no pixel can be called an electron; the metadata says why.
            self._events[frame] = _no_events()
            return
        events = self.options.kernel(pixels, decision.thresholds, self.options.dark)
        self._events[frame] = np.asarray(events, dtype=np.uint32)

    def _count_incomplete(self, decision: ThresholdDecision) -> None:
        for frame, pixels in self.assembly.incomplete_frames():
            self._count(decision, frame, pixels)

    def _sector_histogram(self) -> tuple[np.ndarray, int]:
        geometry = self.assembly.geometry
        rows = geometry.sector_shape[0]
        limit = self._quota * geometry.sectors
        total, n = _empty(), 0
        for sector, pixels in self.assembly.received_sectors(limit):
            dark = self.options.dark
            dark_rows = None if dark is None else dark[sector * rows:(sector + 1) * rows]
            total += counting.sample_histogram([pixels], dark_rows)
            n += 1
        return total, n


def _empty() -> np.ndarray:
    return np.zeros(HISTOGRAM_BINS, dtype=np.int64)


def _no_events() -> np.ndarray:
    return np.zeros(0, dtype=np.uint32)

