"""Check a scan's HDF5 file against the synthetic camera that produced it.

The ground truth of a synthetic scan is exact: the events of a frame are its planted electrons in
the sectors that arrived (lost sectors are zero-filled and hold none), and they must also equal
what stempy's own ``electron_count_frame`` finds with the thresholds recorded in the file. The
stream counters recorded in ``/metadata/stream`` must match the stream plan exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import stempy.image
import stempy.io

from dataplane.synthetic import StreamPlan, SyntheticCamera


@dataclass
class ScanCheck:
    frames: int = 0
    events: int = 0
    incomplete_frames: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _lost_by_frame(plan: StreamPlan) -> dict[int, set[int]]:
    lost: dict[int, set[int]] = defaultdict(set)
    for frame, sector in plan.lost:
        lost[frame].add(sector)
    return lost


def expected_events(camera: SyntheticCamera, frame: int, lost_sectors: set[int]) -> np.ndarray:
    planted = camera.planted(frame)
    if not lost_sectors:
        return planted
    rows_per_sector = camera.spec.frame_shape[0] // camera.spec.sectors
    sector_of = planted // camera.spec.frame_shape[1] // rows_per_sector
    return planted[~np.isin(sector_of, sorted(lost_sectors))]


def received_frame(camera: SyntheticCamera, frame: int, lost_sectors: set[int]) -> np.ndarray:
    """The frame as the consumer assembled it: lost sectors zero-filled."""
    image = camera.frame(frame).copy()
    rows = camera.spec.frame_shape[0] // camera.spec.sectors
    for sector in lost_sectors:
        image[sector * rows:(sector + 1) * rows] = 0
    return image


def verify_scan_file(path: Path, camera: SyntheticCamera, plan: StreamPlan) -> ScanCheck:
    check = ScanCheck()
    counted = stempy.io.load_electron_counts(str(path))
    with h5py.File(path, "r") as f:
        stream = f["metadata/stream"]
        counting = dict(f["metadata/electron_counting"].attrs)
        _check_counters(check, stream, camera, plan)
    background = float(counting["background_threshold"])
    xray = float(counting["x_ray_threshold"])
    lost = _lost_by_frame(plan)
    if tuple(counted.scan_shape) != camera.spec.scan_shape:
        check.problems.append(f"scan shape {counted.scan_shape} != {camera.spec.scan_shape}")
        return check
    for frame in range(camera.spec.scan_shape[0] * camera.spec.scan_shape[1]):
        events = np.sort(np.asarray(counted.data[frame][0], dtype=np.uint32))
        truth = expected_events(camera, frame, lost.get(frame, set()))
        oracle = stempy.image.electron_count_frame(
            received_frame(camera, frame, lost.get(frame, set())),
            background_threshold=background, xray_threshold=xray).data[0][0]
        if not np.array_equal(events, truth):
            check.problems.append(f"frame {frame}: {len(events)} events, {len(truth)} planted")
        if not np.array_equal(events, np.sort(oracle)):
            check.problems.append(
                f"frame {frame}: events differ from stempy's electron_count_frame")
        check.frames += 1
        check.events += len(events)
    return check


def _check_counters(check: ScanCheck, stream: h5py.Group, camera: SyntheticCamera,
                    plan: StreamPlan) -> None:
    positions = camera.spec.scan_shape[0] * camera.spec.scan_shape[1]
    received = positions * camera.spec.sectors - len(plan.lost)
    expected = {
        "received_sectors": received,
        "duplicate_sectors": len(plan.duplicated),
        "expected_sectors": received + len(plan.duplicated),
    }
    for name, value in expected.items():
        if int(stream.attrs[name]) != value:
            check.problems.append(
                f"/metadata/stream {name} = {stream.attrs[name]}, expected {value}")
    incomplete = {frame for frame, _ in plan.lost}
    flagged = set(np.asarray(stream["incomplete_frames"]).tolist())
    if flagged != incomplete:
        check.problems.append(f"incomplete frames flagged {sorted(flagged)}, "
                              f"expected {sorted(incomplete)}")
    manifest = {(int(f), int(s)) for f, s in np.asarray(stream["loss_manifest/frame_sector"])}
    if manifest != set(plan.lost):
        check.problems.append(f"loss manifest lists {len(manifest)} sectors, "
                              f"{len(plan.lost)} were lost")
    want_status = "partial" if plan.lost else "complete"
    status = stream.attrs["status"]
    if (status.decode() if isinstance(status, bytes) else str(status)) != want_status:
        check.problems.append(f"status {status!r}, expected {want_status!r}")
    check.incomplete_frames = len(flagged)
