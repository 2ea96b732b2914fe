"""Frame assembly on one rank: any order, duplicates (identical or conflicting), misrouted and
malformed sectors, scan_end."""

from __future__ import annotations

import numpy as np
import pytest

from common.protocol import Data, RoutedScanBegin, RoutedScanEnd
from dataplane.consumer.assembly import (
    MISROUTED,
    NOT_RECEIVED,
    MissingSector,
    ScanAssembly,
)

SCAN_SHAPE = (2, 4)  # 8 positions
FRAME_SHAPE = (8, 6)  # 4 sectors of 2 rows
SECTORS = 4
MEMBERS, INDEX = 2, 1  # this rank owns frames 1, 3, 5, 7


def _begin() -> RoutedScanBegin:
    return RoutedScanBegin(v=1, session="s1", scan=9, scan_shape=SCAN_SHAPE,
                           frame_shape=FRAME_SHAPE, sectors=SECTORS, dtype="uint16",
                           members=MEMBERS, index=INDEX)


def _end(expected: int, drops: list[tuple[int, int, str]] | None = None) -> RoutedScanEnd:
    return RoutedScanEnd(v=1, scan=9, expected=expected, sent=expected, accepted=expected,
                         dropped={}, drops=drops or [], drops_truncated=False)


def _frame(frame: int) -> np.ndarray:
    rng = np.random.default_rng(frame)
    return rng.integers(1, 60_000, size=FRAME_SHAPE, dtype=np.uint16)


def _sector(frame: int, sector: int) -> bytes:
    rows = FRAME_SHAPE[0] // SECTORS
    return _frame(frame)[sector * rows:(sector + 1) * rows].tobytes()


def _data(frame: int, sector: int) -> Data:
    return Data(v=1, scan=9, frame=frame, sector=sector, seq=0)


def _feed(assembly: ScanAssembly, order: list[tuple[int, int]]) -> dict[int, np.ndarray]:
    done: dict[int, np.ndarray] = {}
    for frame, sector in order:
        pixels = assembly.add(_data(frame, sector), _sector(frame, sector))
        if pixels is not None:
            assert frame not in done, f"frame {frame} was completed twice"
            done[frame] = pixels.copy()
    return done


def test_sectors_in_any_order_complete_each_frame_once_with_the_right_pixels() -> None:
    order = [(f, s) for f in (1, 3, 5, 7) for s in range(SECTORS)]
    np.random.default_rng(4).shuffle(order)
    assembly = ScanAssembly(_begin())
    done = _feed(assembly, order)
    assert sorted(done) == [1, 3, 5, 7]
    for frame, pixels in done.items():
        np.testing.assert_array_equal(pixels, _frame(frame))
    closure = assembly.close(_end(expected=16))
    assert closure.incomplete_frames.size == 0 and closure.missing == []
    assert closure.unaccounted == 0
    assert list(assembly.incomplete_frames()) == []


def test_duplicates_are_dropped_and_counted_before_and_after_completion() -> None:
    assembly = ScanAssembly(_begin())
    order = [(1, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 2), (3, 0), (3, 0)]
    done = _feed(assembly, order)
    assert list(done) == [1]
    counters = assembly.counters
    assert (counters.received, counters.stored, counters.duplicates) == (8, 5, 3)


def _changed(payload: bytes, how: str) -> bytes:
    """The sector with other content: as a retransmission gone wrong might have it."""
    pixels = np.frombuffer(payload, dtype="<u2").copy()
    words = pixels.reshape(-1, 4)  # 8-byte words, 4 pixels each
    if how == "one pixel":
        pixels[5] += 1
    elif how == "one bit of the last pixel":
        pixels[-1] ^= 0x0100
    elif how == "two words swapped":
        words[[0, 1]] = words[[1, 0]]
    elif how == "changes that keep the sum":
        pixels[0] += 1
        pixels[4] -= 1
    elif how == "zeros":
        pixels[:] = 0
    elif how == "another frame's sector":
        return _sector(7, 0)
    return pixels.tobytes()


CHANGES = ["one pixel", "one bit of the last pixel", "two words swapped",
           "changes that keep the sum", "zeros", "another frame's sector"]
# Once a frame is complete only a digest of each sector is left: a wrapping sum of its 8-byte
# words, which copies differing only in these ways keep.
SAME_DIGEST = {"two words swapped", "changes that keep the sum"}


def test_identical_duplicates_are_no_conflict_before_or_after_completion() -> None:
    assembly = ScanAssembly(_begin())
    _feed(assembly, [(1, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 2), (3, 0), (3, 0)])
    counters = assembly.counters
    assert (counters.duplicates, counters.conflicting) == (3, 0)
    assert assembly.close(_end(expected=8)).conflicts == []


@pytest.mark.parametrize("how", CHANGES)
def test_a_differing_copy_of_an_incomplete_frames_sector_conflicts_and_the_first_is_kept(
        how: str) -> None:
    assembly = ScanAssembly(_begin())
    assert assembly.add(_data(1, 2), _sector(1, 2)) is None
    assert assembly.add(_data(1, 2), _changed(_sector(1, 2), how)) is None
    done = _feed(assembly, [(1, 0), (1, 1), (1, 3)])
    np.testing.assert_array_equal(done[1], _frame(1))
    assert (assembly.counters.duplicates, assembly.counters.conflicting) == (1, 1)
    assert assembly.close(_end(expected=5)).conflicts == [(1, 2)]


@pytest.mark.parametrize("how", CHANGES)
def test_a_differing_copy_of_a_complete_frames_sector_conflicts_unless_its_digest_agrees(
        how: str) -> None:
    assembly = ScanAssembly(_begin())
    _feed(assembly, [(3, s) for s in range(SECTORS)])
    assert assembly.add(_data(3, 1), _sector(3, 1)) is None  # the same again: no conflict
    assert assembly.add(_data(3, 1), _changed(_sector(3, 1), how)) is None
    conflicts = 0 if how in SAME_DIGEST else 1
    assert (assembly.counters.duplicates, assembly.counters.conflicting) == (2, conflicts)
    assert assembly.close(_end(expected=6)).conflicts == [(3, 1)] * conflicts


def test_every_conflicting_copy_is_listed_in_frame_and_sector_order() -> None:
    assembly = ScanAssembly(_begin())
    _feed(assembly, [(5, s) for s in range(SECTORS)] + [(1, 3)])
    for frame, sector, how in [(5, 2, "zeros"), (1, 3, "one pixel"), (5, 0, "one pixel"),
                               (5, 2, "one pixel")]:
        assembly.add(_data(frame, sector), _changed(_sector(frame, sector), how))
    closure = assembly.close(_end(expected=9))
    assert closure.conflicts == [(1, 3), (5, 0), (5, 2), (5, 2)]
    assert assembly.counters.conflicting == 4
    # A conflicting sector is in the frame, as first received; only missing ones are lost.
    assert [(m.frame, m.sector) for m in closure.missing if m.frame == 1] == [(1, 0), (1, 1),
                                                                             (1, 2)]


def test_a_sector_of_no_whole_number_of_8_byte_words_is_compared_to_the_last_pixel(
        ) -> None:
    begin = RoutedScanBegin(v=1, session="s1", scan=9, scan_shape=(1, 1), frame_shape=(2, 3),
                            sectors=2, dtype="uint16", members=1, index=0)
    assembly = ScanAssembly(begin)  # sectors of 3 pixels: 6 bytes
    first = np.arange(3, dtype="<u2").tobytes()
    assembly.add(_data(0, 0), first)
    assert assembly.add(_data(0, 1), first) is not None
    assembly.add(_data(0, 0), first)
    assembly.add(_data(0, 0), np.array([0, 1, 3], dtype="<u2").tobytes())
    assert (assembly.counters.duplicates, assembly.counters.conflicting) == (2, 1)


def test_misrouted_and_malformed_sectors_are_rejected_by_reason() -> None:
    assembly = ScanAssembly(_begin())
    assert assembly.add(_data(2, 0), _sector(2, 0)) is None  # 2 % 2 != 1: another rank's frame
    assert assembly.add(_data(1, 0), b"\x00" * 5) is None  # not one sector of payload
    assert assembly.add(_data(9, 0), _sector(1, 0)) is None  # beyond the 8 scan positions
    assert assembly.counters.rejected == {MISROUTED: 1, "wrong_payload_size": 1, "out_of_range": 1}
    assert assembly.counters.stored == 0 and assembly.counters.received == 3


def test_scan_end_zero_fills_flags_and_explains_every_missing_sector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A frame's buffer is not zeroed when it is allocated: here it starts with every bit set.
    def dirty(shape: tuple[int, int], dtype: type[np.uint16]) -> np.ndarray:
        return np.full(shape, 0xFFFF, dtype=dtype)

    monkeypatch.setattr(np, "empty", dirty)
    assembly = ScanAssembly(_begin())
    # Frame 1 complete; frame 3 misses sector 2 (dropped by the gateway); frame 5 misses sectors
    # 0 and 3 (never reached the gateway); frame 7 never arrived at all.
    order = [(1, s) for s in range(4)] + [(3, 0), (3, 1), (3, 3), (5, 1), (5, 2)]
    _feed(assembly, order)
    closure = assembly.close(_end(expected=len(order), drops=[(3, 2, "invalid_header")]))
    assert closure.incomplete_frames.tolist() == [3, 5, 7]
    assert closure.missing_frames.tolist() == [7]
    assert closure.missing == [
        MissingSector(3, 2, "invalid_header"),
        MissingSector(5, 0, NOT_RECEIVED), MissingSector(5, 3, NOT_RECEIVED),
        *[MissingSector(7, s, NOT_RECEIVED) for s in range(4)],
    ]
    rows = FRAME_SHAPE[0] // SECTORS
    frames = dict(assembly.incomplete_frames())
    assert sorted(frames) == [3, 5, 7]
    want3 = _frame(3)
    want3[2 * rows:3 * rows] = 0
    np.testing.assert_array_equal(frames[3], want3)
    want5 = _frame(5)
    want5[0:rows] = 0
    want5[3 * rows:] = 0
    np.testing.assert_array_equal(frames[5], want5)
    assert not frames[7].any()


def test_fewer_messages_than_forwarded_are_reported_as_unaccounted() -> None:
    assembly = ScanAssembly(_begin())
    _feed(assembly, [(1, s) for s in range(4)])
    closure = assembly.close(_end(expected=6))
    assert closure.unaccounted == 2 and closure.received == 4


def test_received_sectors_offers_incomplete_frames_for_fallback_sampling() -> None:
    assembly = ScanAssembly(_begin())
    _feed(assembly, [(3, 1), (5, 0), (5, 2)])
    sectors = list(assembly.received_sectors(limit=2))
    assert len(sectors) == 2
    rows = FRAME_SHAPE[0] // SECTORS
    sector, pixels = sectors[0]
    assert sector == 1
    np.testing.assert_array_equal(pixels, _frame(3)[rows:2 * rows])


def test_closing_twice_is_refused() -> None:
    assembly = ScanAssembly(_begin())
    assembly.close(_end(expected=0))
    with pytest.raises(RuntimeError, match="scan 9 is already closed"):
        assembly.close(_end(expected=0))
