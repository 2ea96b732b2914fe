"""Per-scan assembly of detector sectors into frames, for one consumer rank. Pure: no I/O.

A rank owns the frames with ``frame % members == index``. Sectors arrive in any order and possibly
more than once; a frame is handed back the moment its last sector arrives, so it can be counted at
once and its buffer released. Memory is bounded by one frame buffer per frame still incomplete plus
one flag per owned frame. At ``scan_end`` every owned frame that is not complete is zero-filled
where sectors are missing and flagged, and each missing (frame, sector) gets a reason: the
gateway's, if its drops manifest lists the sector, else ``not_received`` (lost before the gateway,
such as detector UDP loss, or between the gateway and this rank when fewer messages arrived than
were forwarded).

A sector that arrives again is dropped, the first copy kept; a copy whose content differs from the
first is a conflicting duplicate, counted and listed (frame, sector) at ``scan_end``, since which
copy is right cannot be told. While its frame is incomplete the copy is compared with the stored
sector byte for byte. A complete frame's buffer has gone to counting, so for every stored sector
a 64-bit digest is kept: the wrapping sum of its 8-byte words. It tells apart any two copies that
differ in one word, and copies of different data (another frame's sector, the realistic conflict)
but for a chance of about 2**-64; a copy that only reorders the words of the first is not told
apart. It costs 8 bytes per owned sector (8 MiB for a 512 x 512 scan on one rank) and about 3 us
per 4D Camera sector (165 KiB), a tenth of what counting the sector costs; a stronger weighted
digest measured 8 us, a quarter of it, for no realistic gain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from common.protocol import Data, ProtocolError, RoutedScanBegin, RoutedScanEnd

NOT_RECEIVED = "not_received"
# No routed scan_end will ever come: the scan's gateway was lost and nothing began it again.
GATEWAY_LOST = "gateway_lost"
# A scan split over lanes, some of which ended: the others never will (their gateway or producers
# were lost), and what they carried did not come.
LANE_LOST = "lane_lost"
MISROUTED = "misrouted"
CONFLICTING_DUPLICATE = "conflicting_duplicate"


@dataclass(frozen=True, slots=True)
class MissingSector:
    frame: int
    sector: int
    reason: str


@dataclass(slots=True)
class SectorCounters:
    """What happened to the data messages this rank received for one scan."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicting: int = 0  # of the duplicates, those whose content differed from the first copy
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass(frozen=True, slots=True)
class ScanClosure:
    """A rank's account of one scan at ``scan_end``."""

    expected: int
    received: int
    incomplete_frames: np.ndarray  # uint32, sorted: owned frames counted with zero-filled sectors
    missing_frames: np.ndarray  # uint32, sorted: owned frames of which no sector arrived
    missing: list[MissingSector]  # sorted by (frame, sector)
    conflicts: list[tuple[int, int]]  # (frame, sector) per conflicting duplicate, sorted

    @property
    def unaccounted(self) -> int:
        """Messages the gateway forwarded to this rank that never arrived."""
        return max(self.expected - self.received, 0)


class _PartialFrame:
    __slots__ = ("pixels", "present")

    def __init__(self, shape: tuple[int, int]) -> None:
        # Not zeroed: every sector of a frame that completes is written, and an incomplete
        # frame's missing sectors are zeroed when it is handed out (a memset of every frame was
        # 8 % of a rank's CPU).
        self.pixels = np.empty(shape, dtype=np.uint16)
        self.present = 0


class ScanAssembly:
    """Collects one rank's sectors of one scan into frames."""

    def __init__(self, begin: RoutedScanBegin) -> None:
        self.scan = begin.scan
        self.members = begin.members
        self.index = begin.index
        self.geometry = begin.geometry
        self.counters = SectorCounters()
        self._sector_rows = self.geometry.sector_shape[0]
        self._all_present = (1 << self.geometry.sectors) - 1
        owned = len(range(self.index, self.geometry.positions, self.members))
        self._complete = np.zeros(owned, dtype=bool)
        self._partial: dict[int, _PartialFrame] = {}
        self._digests = np.zeros((owned, self.geometry.sectors), dtype=np.uint64)
        self._conflicts: list[tuple[int, int]] = []
        self._closure: ScanClosure | None = None

    @property
    def owned_frames(self) -> int:
        return len(self._complete)

    @property
    def complete_frames(self) -> int:
        return int(np.count_nonzero(self._complete))

    @property
    def closed(self) -> bool:
        return self._closure is not None

    def add(self, msg: Data, payload: bytes | memoryview) -> np.ndarray | None:
        """Store one sector; return the frame's pixels if this sector completed it."""
        self.counters.received += 1
        try:
            self.geometry.check(msg, len(payload))
        except ProtocolError as exc:
            self.counters.reject(exc.reason.value)
            return None
        if msg.frame % self.members != self.index:
            self.counters.reject(MISROUTED)
            return None
        slot = msg.frame // self.members
        partial = self._partial.get(msg.frame)
        bit = 1 << msg.sector
        sector = np.frombuffer(payload, dtype="<u2").reshape(self.geometry.sector_shape)
        if self._complete[slot] or (partial is not None and partial.present & bit):
            self._duplicate(msg, slot, partial, sector)
            return None
        if partial is None:
            partial = self._partial[msg.frame] = _PartialFrame(self.geometry.frame_shape)
        partial.pixels[self._rows(msg.sector)] = sector
        partial.present |= bit
        self._digests[slot, msg.sector] = self._digest(sector)
        self.counters.stored += 1
        if partial.present != self._all_present:
            return None
        del self._partial[msg.frame]
        self._complete[slot] = True
        return partial.pixels

    def _duplicate(self, msg: Data, slot: int, partial: _PartialFrame | None,
                   sector: np.ndarray) -> None:
        """Drop a sector stored before; count it as conflicting if its content differs."""
        self.counters.duplicates += 1
        if partial is not None:
            differs = not np.array_equal(partial.pixels[self._rows(msg.sector)], sector)
        else:
            differs = self._digest(sector) != self._digests[slot, msg.sector]
        if differs:
            self.counters.conflicting += 1
            self._conflicts.append((msg.frame, msg.sector))

    def _rows(self, sector: int) -> slice:
        return slice(sector * self._sector_rows, (sector + 1) * self._sector_rows)

    @staticmethod
    def _digest(sector: np.ndarray) -> np.uint64:
        pixels = sector.reshape(-1)
        if pixels.size % 4:  # not whole 8-byte words (no real detector's sector): zero-padded
            pixels = np.concatenate([pixels, np.zeros(-pixels.size % 4, dtype=pixels.dtype)])
        return np.uint64(pixels.view(np.uint64).sum(dtype=np.uint64))

    def received_sectors(self, limit: int) -> Iterator[tuple[int, np.ndarray]]:
        """Up to ``limit`` (sector index, pixels) pairs from frames still incomplete."""
        given = 0
        for partial in self._partial.values():
            for sector in range(self.geometry.sectors):
                if given >= limit:
                    return
                if partial.present & (1 << sector):
                    given += 1
                    yield sector, partial.pixels[self._rows(sector)]

    def close(self, end: RoutedScanEnd, missing_reason: str = NOT_RECEIVED) -> ScanClosure:
        """Account for every owned frame; call once, at the routed ``scan_end`` (or what stands
        for it). A missing sector the end's drops manifest does not list gets ``missing_reason``.
        """
        if self._closure is not None:
            raise RuntimeError(f"scan {self.scan} is already closed")
        manifest = {(frame, sector): reason for frame, sector, reason in end.drops}
        incomplete = self._incomplete_ids()
        missing: list[MissingSector] = []
        never_seen: list[int] = []
        for frame in incomplete.tolist():
            partial = self._partial.get(frame)
            present = partial.present if partial is not None else 0
            if not present:
                never_seen.append(frame)
            for sector in range(self.geometry.sectors):
                if not present & (1 << sector):
                    reason = manifest.get((frame, sector), missing_reason)
                    missing.append(MissingSector(frame, sector, reason))
        self._closure = ScanClosure(
            expected=end.expected, received=self.counters.received,
            incomplete_frames=incomplete, missing_frames=np.asarray(never_seen, dtype=np.uint32),
            missing=missing, conflicts=sorted(self._conflicts))
        return self._closure

    def incomplete_frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """After ``close``: each incomplete frame, zero-filled, releasing its buffer as it goes."""
        if self._closure is None:
            raise RuntimeError(f"scan {self.scan} is not closed yet")
        for frame in self._closure.incomplete_frames.tolist():
            partial = self._partial.pop(frame, None)
            if partial is None:
                yield frame, np.zeros(self.geometry.frame_shape, dtype=np.uint16)
                continue
            for sector in range(self.geometry.sectors):
                if not partial.present & (1 << sector):
                    partial.pixels[self._rows(sector)] = 0
            yield frame, partial.pixels

    def _incomplete_ids(self) -> np.ndarray:
        slots = np.flatnonzero(~self._complete)
        return (slots * self.members + self.index).astype(np.uint32)
