"""The diffraction pattern sum and the virtual bright-field image of a scan, from HDF5 files written
by the consumer's own writer, and their PNGs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import stempy.io
from PIL import Image

from common.protocol import Data, RoutedScanBegin, RoutedScanEnd
from controlplane.errors import PictureError
from controlplane.pictures import (
    DEFAULT_RADIUS_FRACTION,
    Limits,
    PictureCache,
    ScanEvents,
    compute,
    disk,
    load_pictures,
    read_events,
    render,
)
from dataplane import counting
from dataplane.consumer.outcome import RankParts, merge
from dataplane.consumer.scanwork import (
    CountingOptions,
    ScanWork,
    ThresholdDecision,
    decide_thresholds,
)
from dataplane.consumer.writer import write_scan
from dataplane.synthetic import CameraSpec, SyntheticCamera

# Neither shape is square, so a row/column mix-up shows.
SCAN_SHAPE = (3, 5)
FRAME_SHAPE = (64, 96)
COUNTERS = {"rejected": {}, "expected": 0, "received": 0, "stored": 0, "duplicates": 0,
            "conflicting": 0, "unaccounted": 0, "drops_truncated": False}


def _begin(scan_shape: tuple[int, int], frame_shape: tuple[int, int]) -> RoutedScanBegin:
    return RoutedScanBegin(v=1, session="pics", scan=7, scan_shape=scan_shape,
                           frame_shape=frame_shape, sectors=4, dtype="uint16", members=1, index=0)


def _end() -> RoutedScanEnd:
    return RoutedScanEnd(v=1, scan=7, expected=0, sent=0, accepted=0, dropped={}, drops=[],
                         drops_truncated=False)


def write_events(directory: Path, frames: list[np.ndarray],
                 scan_shape: tuple[int, int] = SCAN_SHAPE,
                 frame_shape: tuple[int, int] = FRAME_SHAPE) -> Path:
    """A scan file holding ``frames`` (one sorted index array per position), by the writer."""
    counts = np.array([len(f) for f in frames], dtype=np.int64)
    parts = RankParts(
        frame_ids=np.arange(len(frames), dtype=np.uint32), event_counts=counts,
        events=np.concatenate(frames).astype(np.uint32), incomplete_frames=np.zeros(0, np.uint32),
        missing_frames=np.zeros(0, np.uint32), lost=np.zeros((0, 2), np.uint32), lost_reasons=[],
        conflicts=np.zeros((0, 2), np.uint32), counters=[COUNTERS])
    outcome = merge(_begin(scan_shape, frame_shape), _end(),
                    ThresholdDecision(None, "none", 0), parts)
    return write_scan(directory, outcome).path


def flat(row: int, col: int, frame_shape: tuple[int, int] = FRAME_SHAPE) -> int:
    return row * frame_shape[1] + col


def random_frames(seed: int, positions: int, frame_shape: tuple[int, int] = FRAME_SHAPE,
                  ) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = frame_shape[0] * frame_shape[1]
    return [np.sort(rng.choice(pixels, size=int(rng.integers(0, 30)), replace=False))
            .astype(np.uint32) for _ in range(positions)]


@pytest.fixture(scope="module")
def counted_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticCamera]:
    """A synthetic camera's scan counted by the consumer's scan work and written by its writer."""
    spec = CameraSpec(scan_shape=SCAN_SHAPE, frame_shape=FRAME_SHAPE, seed=5,
                      electrons_per_frame=12)
    camera = SyntheticCamera(spec)
    begin = _begin(SCAN_SHAPE, FRAME_SHAPE)
    work = ScanWork(begin, CountingOptions(kernel=counting.count_frame, samples=3), ranks=1)
    pairs = [(f, s) for f in range(spec.positions) for s in range(spec.sectors)]
    for frame, sector in pairs:
        work.add(Data(v=1, scan=7, frame=frame, sector=sector, seq=0),
                 camera.sector(frame, sector).tobytes())
    work.decide(decide_thresholds(work.contribution(), 4.0, 10.0))
    end = RoutedScanEnd(v=1, scan=7, expected=len(pairs), sent=len(pairs), accepted=len(pairs),
                        dropped={}, drops=[], drops_truncated=False)
    work.close(end)
    result = work.result()
    closure = result.closure
    parts = RankParts(
        frame_ids=result.frame_ids, event_counts=result.event_counts, events=result.events,
        incomplete_frames=closure.incomplete_frames, missing_frames=closure.missing_frames,
        lost=np.zeros((0, 2), np.uint32), lost_reasons=[], conflicts=np.zeros((0, 2), np.uint32),
        counters=[result.counters])
    assert work.decision is not None
    directory = tmp_path_factory.mktemp("counted")
    return write_scan(directory, merge(begin, end, work.decision, parts)).path, camera


def test_the_diffraction_sum_is_the_histogram_of_the_planted_electrons(
        counted_scan: tuple[Path, SyntheticCamera]) -> None:
    path, camera = counted_scan
    expected = np.zeros(FRAME_SHAPE, dtype=np.int64)
    for position in range(camera.spec.positions):
        for index in camera.planted(position).tolist():
            expected[index // FRAME_SHAPE[1], index % FRAME_SHAPE[1]] += 1
    pictures = load_pictures(path)
    assert pictures.diffraction.shape == FRAME_SHAPE
    np.testing.assert_array_equal(pictures.diffraction, expected)
    assert pictures.bright_field.shape == SCAN_SHAPE
    assert pictures.bright_field.sum() <= expected.sum()


def test_the_events_read_are_those_stempy_reads(counted_scan: tuple[Path,
                                                                    SyntheticCamera]) -> None:
    path, _ = counted_scan
    events = read_events(path)
    loaded = stempy.io.load_electron_counts(str(path))
    assert events.scan_shape == tuple(loaded.scan_shape) == SCAN_SHAPE
    assert events.frame_shape == tuple(loaded.frame_shape) == FRAME_SHAPE
    assert len(events.frames) == loaded.data.shape[0]
    for position, frame in enumerate(events.frames):
        np.testing.assert_array_equal(frame, loaded.data[position][0])
    # stempy's own dense sum over the scan is the diffraction pattern sum.
    dense = loaded.to_dense().sum(axis=(0, 1))
    np.testing.assert_array_equal(load_pictures(path).diffraction, dense)


def test_the_bright_field_counts_exactly_the_events_inside_the_disk(tmp_path: Path) -> None:
    """Events sit symmetrically around a known centre, so the centre of mass is that centre;
    positions whose events are all inside the disk count them all, the others count none."""
    centre = (30, 50)
    radius = 8.0
    inside = [flat(centre[0] + dr, centre[1] + dc) for dr, dc in
              [(0, 0), (3, 0), (-3, 0), (0, 5), (0, -5)]]
    outside = [flat(centre[0] + dr, centre[1] + dc) for dr, dc in
               [(20, 0), (-20, 0), (0, 30), (0, -30)]]
    positions = SCAN_SHAPE[0] * SCAN_SHAPE[1]
    bright = {1, 7, 13}
    frames = [np.array(sorted(inside if p in bright else outside), dtype=np.uint32)
              for p in range(positions)]
    pictures = load_pictures(write_events(tmp_path, frames), radius=radius)
    assert pictures.centre == pytest.approx(centre)
    expected = np.zeros(positions, dtype=np.int64)
    expected[sorted(bright)] = len(inside)
    np.testing.assert_array_equal(pictures.bright_field, expected.reshape(SCAN_SHAPE))


def test_the_bright_field_is_the_disk_mask_applied_to_every_position(tmp_path: Path) -> None:
    frames = random_frames(3, SCAN_SHAPE[0] * SCAN_SHAPE[1])
    pictures = load_pictures(write_events(tmp_path, frames))
    assert pictures.radius == DEFAULT_RADIUS_FRACTION * min(FRAME_SHAPE)
    mask = disk(FRAME_SHAPE, pictures.centre, pictures.radius).ravel()
    expected = [int(mask[f].sum()) for f in frames]
    assert pictures.bright_field.ravel().tolist() == expected


def disk_frames(positions: int, centre: tuple[int, int], radius: int) -> list[np.ndarray]:
    """Every pixel within ``radius`` of ``centre`` on every frame, and one far pixel per frame
    that moves along the first row."""
    rows, cols = np.indices(FRAME_SHAPE)
    inside = np.flatnonzero((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2)
    return [np.sort(np.append(inside, flat(0, p))).astype(np.uint32) for p in range(positions)]


def test_the_default_radius_is_the_edge_of_the_bright_disk(tmp_path: Path) -> None:
    positions = SCAN_SHAPE[0] * SCAN_SHAPE[1]
    frames = disk_frames(positions, (30, 50), 10)
    pictures = load_pictures(write_events(tmp_path, frames))
    assert pictures.centre == pytest.approx((30, 50), abs=0.5)
    assert 9.5 <= pictures.radius <= 10.5
    # Every position counts (nearly all of) its disk, and not the far pixel; the outermost ring
    # of the disk, half of whose area lies outside it, may fall on either side of the edge.
    mask = disk(FRAME_SHAPE, pictures.centre, pictures.radius).ravel()
    expected = [int(mask[f].sum()) for f in frames]
    assert pictures.bright_field.ravel().tolist() == expected
    assert 0.9 * (len(frames[0]) - 1) <= min(expected) <= max(expected) <= len(frames[0]) - 1


def test_too_few_events_for_a_disk_give_the_fixed_radius() -> None:
    pictures = compute(ScanEvents(disk_frames(1, (30, 50), 10), (1, 1), FRAME_SHAPE))
    assert pictures.radius == DEFAULT_RADIUS_FRACTION * min(FRAME_SHAPE)


def test_several_frames_per_position_add_up_in_row_major_order() -> None:
    frames = [np.array([flat(1, 1)], np.uint32), np.array([flat(1, 2)], np.uint32),
              np.array([], np.uint32), np.array([flat(60, 90)], np.uint32)]
    pictures = compute(ScanEvents(frames, (1, 2), FRAME_SHAPE), radius=200.0)
    assert pictures.bright_field.tolist() == [[2, 1]]
    assert pictures.diffraction.sum() == 3


def test_a_scan_without_events_gives_black_pictures(tmp_path: Path) -> None:
    frames = [np.zeros(0, np.uint32)] * (SCAN_SHAPE[0] * SCAN_SHAPE[1])
    rendered = render(load_pictures(write_events(tmp_path, frames)))
    assert rendered.pictures.centre == ((FRAME_SHAPE[0] - 1) / 2, (FRAME_SHAPE[1] - 1) / 2)
    for png in (rendered.diffraction_png, rendered.bright_field_png):
        assert not np.asarray(Image.open(io.BytesIO(png))).any()


def test_the_pngs_decode_to_the_shapes_and_repeat_byte_for_byte(tmp_path: Path) -> None:
    path = write_events(tmp_path, random_frames(4, SCAN_SHAPE[0] * SCAN_SHAPE[1]))
    first = render(load_pictures(path))
    second = render(load_pictures(path))
    assert first.diffraction_png == second.diffraction_png
    assert first.bright_field_png == second.bright_field_png
    diffraction = Image.open(io.BytesIO(first.diffraction_png))
    bright_field = Image.open(io.BytesIO(first.bright_field_png))
    assert (diffraction.format, diffraction.mode) == ("PNG", "L")
    assert (bright_field.format, bright_field.mode) == ("PNG", "L")
    # Pillow gives (width, height): columns then rows.
    assert diffraction.size == (FRAME_SHAPE[1], FRAME_SHAPE[0])
    assert bright_field.size == (SCAN_SHAPE[1], SCAN_SHAPE[0])
    counts = first.pictures.diffraction
    levels = np.asarray(diffraction)
    assert levels.max() == 255 and (levels[counts == 0] == 0).all()
    assert (levels[counts == counts.max()] == 255).all()
    # Linear bright field: the faintest position is black, the brightest white.
    bf_levels = np.asarray(bright_field).ravel()
    bf = first.pictures.bright_field.ravel()
    assert bf_levels[bf.argmin()] == 0 and bf_levels[bf.argmax()] == 255


def test_the_diffraction_png_is_log_scaled() -> None:
    frames = [np.array([flat(0, 0)], np.uint32)] + [np.array([flat(1, 1)], np.uint32)] * 99
    pictures = compute(ScanEvents(frames, (10, 10), FRAME_SHAPE))
    levels = np.asarray(Image.open(io.BytesIO(render(pictures).diffraction_png)))
    # 1 count against 99: linear would give 3; log(2) / log(100) of 255 is 38.
    assert (levels[0, 0], levels[1, 1]) == (38, 255)


def test_the_cache_serves_a_file_once_until_it_changes(tmp_path: Path) -> None:
    path = write_events(tmp_path, random_frames(5, SCAN_SHAPE[0] * SCAN_SHAPE[1]))
    cache = PictureCache(max_entries=2)
    first = cache.get(path, "abc")
    assert cache.get(path, "abc") is first
    assert cache.get(path, "other checksum") is not first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.get(path, "abc") is not first
    assert len(cache) == 2


def test_the_cache_forgets_the_least_recently_used_file(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        directory = tmp_path / str(i)
        directory.mkdir()
        paths.append(write_events(directory, random_frames(i, SCAN_SHAPE[0] * SCAN_SHAPE[1])))
    cache = PictureCache(max_entries=2)
    a = cache.get(paths[0])
    cache.get(paths[1])
    assert cache.get(paths[0]) is a  # now the most recent
    cache.get(paths[2])  # evicts paths[1]
    assert cache.get(paths[0]) is a
    assert len(cache) == 2
    with pytest.raises(PictureError, match="needs room"):
        PictureCache(max_entries=0)


# --- refusals --------------------------------------------------------------------------------


def test_a_file_beyond_the_limits_is_refused(tmp_path: Path) -> None:
    frames = [np.array([flat(1, 1), flat(2, 2)], np.uint32)] * (SCAN_SHAPE[0] * SCAN_SHAPE[1])
    path = write_events(tmp_path, frames)
    with pytest.raises(PictureError, match="15 scan positions, more than the 14 allowed"):
        read_events(path, Limits(max_positions=14))
    with h5py.File(path, "r+") as f:  # 15 frames on 5 positions: 3 frames each
        f["electron_events/scan_positions"].attrs["Ny"] = 1
    assert len(read_events(path, Limits(max_positions=15)).frames) == 15
    with pytest.raises(PictureError, match="15 frames, more than the 5 allowed"):
        read_events(path, Limits(max_positions=5))
    with pytest.raises(PictureError, match="6144 pixels per frame, more than the 6143 allowed"):
        read_events(path, Limits(max_frame_pixels=6143))
    with pytest.raises(PictureError, match="more than the 29 events allowed"):
        read_events(path, Limits(max_events=29))
    assert sum(len(f) for f in read_events(path, Limits(max_positions=15,
                                                        max_events=30)).frames) == 30


def test_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = write_events(tmp_path, random_frames(6, SCAN_SHAPE[0] * SCAN_SHAPE[1]))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(PictureError, match="cannot read the electron events"):
        load_pictures(path)
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5 at all\n")
    with pytest.raises(PictureError, match="cannot read the electron events"):
        load_pictures(text)
    with pytest.raises(PictureError, match="cannot read the electron events"):
        PictureCache().get(tmp_path / "absent.h5")


def _edit(path: Path, change: str) -> None:
    with h5py.File(path, "r+") as f:
        if change == "version":
            f.attrs["version"] = 2
        elif change == "no frames":
            del f["electron_events/frames"]
        elif change == "frame attribute":
            del f["electron_events/frames"].attrs["Ny"]
        elif change == "scan shape":
            f["electron_events/scan_positions"].attrs["Nx"] = 4
        elif change == "zero scan shape":
            f["electron_events/scan_positions"].attrs["Nx"] = 0
        elif change == "float attribute":
            f["electron_events/frames"].attrs["Nx"] = 64.0
        elif change == "frame dtype":
            del f["electron_events/frames"]
            f["electron_events"].create_dataset("frames", data=np.zeros(15, np.float32))


@pytest.mark.parametrize(("change", "message"), [
    ("version", "not stempy's electron-counted layout version 3 .file version: 2"),
    ("no frames", "no dataset electron_events/frames"),
    ("frame attribute", "lacks the attribute.s. Ny"),
    ("scan shape", "15 frames do not fill the 12 scan positions"),
    ("zero scan shape", "scan_shape must be two positive integers"),
    ("float attribute", "attributes .* are not integers"),
    ("frame dtype", "not one variable-length uint32 array per frame"),
])
def test_a_file_in_another_layout_is_refused(tmp_path: Path, change: str, message: str) -> None:
    path = write_events(tmp_path, random_frames(7, SCAN_SHAPE[0] * SCAN_SHAPE[1]))
    _edit(path, change)
    with pytest.raises(PictureError, match=message):
        load_pictures(path)


@pytest.mark.parametrize(("events", "radius", "message"), [
    (ScanEvents([np.array([0], np.uint32)], (1, 1), (4, 4)), -1.0, "radius must be"),
    (ScanEvents([np.array([0], np.uint32)], (1, 1), (4, 4)), float("nan"), "radius must be"),
    (ScanEvents([np.array([16], np.uint32)], (1, 1), (4, 4)), None, "outside the frame's 16"),
    (ScanEvents([np.array([-1], np.int64)], (1, 1), (4, 4)), None, "outside the frame's 16"),
    (ScanEvents([np.array([0.5])], (1, 1), (4, 4)), None, "frame 0 is not a 1-D array"),
    (ScanEvents([np.zeros((1, 1), np.uint32)], (1, 1), (4, 4)), None, "frame 0 is not a 1-D"),
    (ScanEvents([np.array([0], np.uint32)], (1, 2), (4, 4)), None, "1 frames do not fill"),
    (ScanEvents([np.array([0], np.uint32)], (1, 1), (4, 0)), None, "frame_shape must be"),
    (ScanEvents([np.array([0], np.uint32)], (1, 1, 1), (4, 4)), None, "scan_shape must be"),
])
def test_events_that_do_not_fit_their_shapes_are_refused(events: ScanEvents,
                                                         radius: float | None,
                                                         message: str) -> None:
    with pytest.raises(PictureError, match=message):
        compute(events, radius=radius)
