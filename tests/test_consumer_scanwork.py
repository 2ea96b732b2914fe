"""One rank's scan work without MPI: waiting for thresholds, sample fallbacks, merge, the file.

The threshold agreement across ranks is a sum of the ranks' contribution vectors; with one rank the
sum is its own vector, which is what these tests pass to ``decide_thresholds``.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import stempy.io

from common.protocol import Data, RoutedScanBegin, RoutedScanEnd
from dataplane import counting
from dataplane.consumer.agreement import decode_decision, encode_decision
from dataplane.consumer.errors import WriteError
from dataplane.consumer.outcome import RankParts, merge
from dataplane.consumer.report import written_result
from dataplane.consumer.scanwork import CountingOptions, ScanWork, decide_thresholds
from dataplane.consumer.writer import scan_file_name, write_scan
from dataplane.synthetic import CameraSpec, SyntheticCamera

SPEC = CameraSpec(scan_shape=(2, 4), frame_shape=(64, 64), seed=21, electrons_per_frame=6)
OPTIONS = CountingOptions(kernel=counting.count_frame, samples=3)


def _begin(camera: SyntheticCamera) -> RoutedScanBegin:
    spec = camera.spec
    return RoutedScanBegin(v=1, session="unit", scan=4, scan_shape=spec.scan_shape,
                           frame_shape=spec.frame_shape, sectors=spec.sectors, dtype="uint16",
                           members=1, index=0)


def _end(expected: int) -> RoutedScanEnd:
    return RoutedScanEnd(v=1, scan=4, expected=expected, sent=expected, accepted=expected,
                         dropped={}, drops=[], drops_truncated=False)


def _feed(work: ScanWork, camera: SyntheticCamera, pairs: list[tuple[int, int]]) -> None:
    for frame, sector in pairs:
        work.add(Data(v=1, scan=4, frame=frame, sector=sector, seq=0),
                 camera.sector(frame, sector).tobytes())


def _agree(work: ScanWork) -> None:
    assert work.ready_to_contribute
    decision = decide_thresholds(work.contribution(), OPTIONS.background_n_sigma,
                                 OPTIONS.xray_n_sigma)
    # The decision travels to the other ranks as bytes; it must survive the trip unchanged.
    work.decide(decode_decision(encode_decision(decision)))


def _parts(work: ScanWork) -> RankParts:
    result = work.result()
    closure = result.closure
    return RankParts(
        frame_ids=result.frame_ids, event_counts=result.event_counts, events=result.events,
        incomplete_frames=closure.incomplete_frames, missing_frames=closure.missing_frames,
        lost=np.array([(m.frame, m.sector) for m in closure.missing],
                      dtype=np.uint32).reshape(-1, 2),
        lost_reasons=[m.reason for m in closure.missing],
        conflicts=np.array(closure.conflicts, dtype=np.uint32).reshape(-1, 2),
        counters=[result.counters])


def test_frames_wait_for_thresholds_then_all_frames_are_counted_exactly() -> None:
    camera = SyntheticCamera(SPEC)
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    pairs = [(f, s) for f in range(SPEC.positions) for s in range(4) if (f, s) != (6, 1)]
    _feed(work, camera, pairs[:12])  # three complete frames: the sample quota
    assert work.counted_frames == 0 and work.ready_to_contribute
    _agree(work)
    assert work.counted_frames == 3 and work.decision is not None
    assert work.decision.source == "frames" and work.decision.samples == 3
    _feed(work, camera, pairs[12:])
    assert work.counted_frames == SPEC.positions - 1  # frame 6 still lacks sector 1
    work.close(_end(len(pairs)))
    result = work.result()
    assert result.frame_ids.tolist() == list(range(SPEC.positions))
    bounds = np.concatenate([[0], np.cumsum(result.event_counts)])
    for i, frame in enumerate(result.frame_ids.tolist()):
        events = result.events[bounds[i]:bounds[i + 1]]
        if frame != 6:
            np.testing.assert_array_equal(events, camera.planted(frame))
        image = camera.frame(frame).copy()
        if frame == 6:
            image[SPEC.sector_rows:2 * SPEC.sector_rows] = 0
        np.testing.assert_array_equal(
            events, counting.count_frame_stempy(image, work.decision.thresholds))


def test_without_a_complete_frame_thresholds_come_from_sectors_and_say_so() -> None:
    camera = SyntheticCamera(SPEC)
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    pairs = [(f, s) for f in range(SPEC.positions) for s in range(3)]  # sector 3 never arrives
    _feed(work, camera, pairs)
    assert not work.ready_to_contribute
    work.close(_end(len(pairs)))
    _agree(work)
    assert work.decision is not None and work.decision.thresholds is not None
    metadata = work.decision.as_metadata()
    assert metadata["source"] == "sectors" and metadata["samples"] == 3 * 4
    outcome = merge(work.begin, _end(len(pairs)), work.decision, _parts(work))
    assert outcome.status == "partial" and len(outcome.incomplete_frames) == SPEC.positions
    assert outcome.events > 0


def test_a_scan_without_any_pixel_has_no_thresholds_and_no_events() -> None:
    camera = SyntheticCamera(SPEC)
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    work.close(_end(0))
    _agree(work)
    assert work.decision is not None and work.decision.source == "none"
    outcome = merge(work.begin, _end(0), work.decision, _parts(work))
    assert outcome.events == 0 and outcome.status == "partial"
    assert outcome.missing_frames.tolist() == list(range(SPEC.positions))


def test_a_scan_closed_for_its_lost_gateway_lists_what_never_came_and_expects_what_arrived(
        ) -> None:
    camera = SyntheticCamera(SPEC)
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    arrived = [(f, s) for f in range(3) for s in range(SPEC.sectors)] + [(3, 0), (0, 1)]
    _feed(work, camera, arrived)
    closure = work.close_lost()
    _agree(work)
    assert work.end is not None and work.decision is not None
    outcome = merge(work.begin, work.end, work.decision, _parts(work))
    assert outcome.status == "partial"
    stored = len(arrived) - 1  # (0, 1) came twice
    assert outcome.totals["expected_sectors"] == closure.received == len(arrived)
    assert outcome.totals["unaccounted_sectors"] == 0
    assert (outcome.end.sent, outcome.end.accepted) == (0, 0)
    lost = [(f, s) for f in range(SPEC.positions) for s in range(SPEC.sectors)
            if (f, s) not in arrived]
    assert len(lost) == SPEC.positions * SPEC.sectors - stored
    assert outcome.lost.tolist() == [list(p) for p in lost]
    assert set(outcome.lost_reasons) == {"gateway_lost"}
    # The frames that arrived whole are counted as planted.
    assert [sorted(e.tolist()) for e in outcome.frame_events[:3, 0]] == [
        sorted(camera.planted(f).tolist()) for f in range(3)]


def test_written_file_is_stempy_readable_with_equal_length_frames_and_no_temporary(
        tmp_path: Path) -> None:
    camera = SyntheticCamera(SPEC)  # every frame plants the same number of electrons
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    pairs = [(f, s) for f in range(SPEC.positions) for s in range(4)]
    _feed(work, camera, pairs)
    _agree(work)
    work.close(_end(len(pairs)))
    outcome = merge(work.begin, _end(len(pairs)), work.decision, _parts(work))
    written = write_scan(tmp_path, outcome)
    assert written.path == tmp_path / scan_file_name("unit", 4) == tmp_path / "unit_scan000004.h5"
    assert os.listdir(tmp_path) == [written.path.name]
    loaded = stempy.io.load_electron_counts(str(written.path))
    for frame in range(SPEC.positions):
        np.testing.assert_array_equal(np.sort(loaded.data[frame][0]), camera.planted(frame))
    assert loaded.metadata["electron_counting"]["x_ray_threshold"] == work.decision.thresholds.xray
    with h5py.File(written.path, "r") as f:
        assert f["metadata/stream"].attrs["status"] == "complete"
        assert f["metadata/stream/loss_manifest/frame_sector"].shape == (0, 2)


def test_a_conflicting_duplicate_is_in_the_files_manifest_and_result_and_the_scan_partial(
        tmp_path: Path) -> None:
    camera = SyntheticCamera(SPEC)
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    pairs = [(f, s) for f in range(SPEC.positions) for s in range(4)]
    _feed(work, camera, pairs)
    other = camera.sector(5, 2).copy()
    other[0, 0] += 1
    work.add(Data(v=1, scan=4, frame=5, sector=2, seq=0), other.tobytes())
    _feed(work, camera, [(6, 0)])  # the same again: a duplicate, not a conflict
    _agree(work)
    work.close(_end(len(pairs) + 2))
    outcome = merge(work.begin, _end(len(pairs) + 2), work.decision, _parts(work))
    assert outcome.status == "partial"
    result = written_result(outcome, write_scan(tmp_path, outcome))
    assert (result.status, result.duplicate_sectors, result.conflicting_duplicates) == (
        "partial", 2, 1)
    assert (result.lost_sectors, result.loss_manifest, result.manifest_truncated) == (
        0, ((5, 2, "conflicting_duplicate"),), False)
    with h5py.File(result.path, "r") as f:
        stream = f["metadata/stream"]
        assert (stream.attrs["status"], stream.attrs["conflicting_duplicates"],
                stream.attrs["duplicate_sectors"], stream.attrs["lost_sectors"]) == (
            "partial", 1, 2, 0)
        assert stream["loss_manifest/frame_sector"][()].tolist() == [[5, 2]]
        assert stream["loss_manifest/reason"].asstr()[()].tolist() == ["conflicting_duplicate"]
    # The first copy is the one counted.
    loaded = stempy.io.load_electron_counts(result.path)
    np.testing.assert_array_equal(np.sort(loaded.data[5][0]), camera.planted(5))


def test_a_failed_write_leaves_no_file_behind(tmp_path: Path) -> None:
    camera = SyntheticCamera(SPEC)
    work = ScanWork(_begin(camera), OPTIONS, ranks=1)
    work.close(_end(0))
    _agree(work)
    outcome = merge(work.begin, _end(0), work.decision, _parts(work))
    missing_dir = tmp_path / "absent"
    with pytest.raises(WriteError, match="cannot write scan 4"):
        write_scan(missing_dir, outcome)
    assert not missing_dir.exists() and os.listdir(tmp_path) == []
