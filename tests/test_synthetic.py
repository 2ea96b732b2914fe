"""The synthetic 4D Camera's exact ground truth (against stempy) and the stream plans'
fault model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import stempy.image
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.counting import Thresholds, sample_histogram, thresholds_from_histogram
from dataplane.synthetic import (
    SHARED_RANGE,
    CameraSpec,
    StreamPlan,
    SyntheticCamera,
    SyntheticError,
)

SEEDS = [0, 1, 2, 7]


def _thresholds(camera: SyntheticCamera, samples: int) -> Thresholds:
    frames = (camera.frame(i) for i in range(samples))
    return thresholds_from_histogram(sample_histogram(frames, camera.dark_reference()), samples)


def _stempy_events(frame: np.ndarray, thresholds: Thresholds,
                   dark: np.ndarray | None) -> np.ndarray:
    counted = stempy.image.electron_count_frame(frame, darkreference=dark,
                                                background_threshold=thresholds.background,
                                                xray_threshold=thresholds.xray)
    return np.sort(np.asarray(counted.data[0, 0], dtype=np.uint32))


def test_frames_are_deterministic_in_seed_and_index() -> None:
    spec = CameraSpec(scan_shape=(2, 2), seed=3)
    first, again = SyntheticCamera(spec), SyntheticCamera(spec)
    assert np.array_equal(first.frame(2), again.frame(2))
    assert np.array_equal(first.planted(2), again.planted(2))
    assert not np.array_equal(first.frame(2), first.frame(3))
    other_seed = SyntheticCamera(CameraSpec(scan_shape=(2, 2), seed=4))
    assert not np.array_equal(first.planted(2), other_seed.planted(2))


def test_sectors_are_contiguous_row_bands_of_the_frame() -> None:
    camera = SyntheticCamera(CameraSpec(scan_shape=(1, 2), dark=True))
    frame = camera.frame(1)
    assert frame.shape == (576, 576) and frame.dtype == np.uint16
    for k in range(4):
        sector = camera.sector(1, k)
        assert sector.flags.c_contiguous and sector.shape == (144, 576)
        assert np.array_equal(sector, frame[144 * k:144 * (k + 1)])


@pytest.mark.parametrize("seed", SEEDS)
def test_planted_electrons_are_isolated_in_range_and_reach_the_borders(seed: int) -> None:
    spec = CameraSpec(scan_shape=(2, 4), seed=seed, xray_rate=0.5)
    camera = SyntheticCamera(spec)
    rows, cols = spec.frame_shape
    low, high = spec.electron_range
    for index in range(spec.positions):
        frame, planted = camera.frame(index), camera.planted(index)
        assert planted.dtype == np.uint32 and len(planted) == spec.electrons_per_frame
        assert np.all(np.diff(planted.astype(np.int64)) > 0)
        r, c = np.divmod(planted.astype(np.int64), cols)
        chebyshev = np.maximum(abs(r[:, None] - r[None, :]), abs(c[:, None] - c[None, :]))
        np.fill_diagonal(chebyshev, rows)
        assert chebyshev.min() >= 2
        assert np.all((frame[r, c] >= low) & (frame[r, c] <= high))
        assert {0, rows - 1} <= set(r.tolist()) and {0, cols - 1} <= set(c.tolist())
        assert any(ri in (0, rows - 1) and ci in (0, cols - 1)
                   for ri, ci in zip(r, c, strict=True))


@pytest.mark.parametrize("seed", SEEDS)
def test_every_other_pixel_is_background_charge_sharing_or_an_isolated_xray(seed: int) -> None:
    spec = CameraSpec(scan_shape=(1, 4), seed=seed, xray_rate=1.0)
    camera = SyntheticCamera(spec)
    for index in range(spec.positions):
        frame = camera.frame(index).astype(np.int64)
        near_electron = np.zeros(frame.shape, dtype=bool)
        r, c = np.divmod(camera.planted(index).astype(np.int64), spec.frame_shape[1])
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                inside = (rr >= 0) & (rr < frame.shape[0]) & (cc >= 0) & (cc < frame.shape[1])
                near_electron[rr[inside], cc[inside]] = True
        rest = frame.copy()
        rest[r, c] = 0
        xray = rest >= spec.xray_min
        shared = (rest >= SHARED_RANGE[0]) & (rest <= SHARED_RANGE[1])
        assert xray.sum() == 1 and not np.any(xray & near_electron)
        assert shared.any() and np.all(near_electron[shared])
        assert rest[~xray & ~shared].max() <= spec.background_max


@pytest.mark.parametrize("samples", [10, 40])
@pytest.mark.parametrize("seed", SEEDS)
def test_thresholds_from_sample_frames_fall_inside_the_windows(seed: int, samples: int) -> None:
    spec = CameraSpec(scan_shape=(8, 8), seed=seed, dark=seed % 2 == 1)
    thresholds = _thresholds(SyntheticCamera(spec), samples)
    assert spec.background_max < thresholds.background < spec.electron_range[0]
    assert spec.electron_range[1] < thresholds.xray < spec.xray_min


@pytest.mark.parametrize("dark", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_stempy_counts_exactly_the_planted_electrons(seed: int, dark: bool) -> None:
    spec = CameraSpec(scan_shape=(4, 8), seed=seed, dark=dark, xray_rate=0.5)
    camera = SyntheticCamera(spec)
    thresholds = _thresholds(camera, 10)
    for index in range(spec.positions):
        events = _stempy_events(camera.frame(index), thresholds, camera.dark_reference())
        assert np.array_equal(events, camera.planted(index)), f"frame {index}"


def test_dark_frames_count_correctly_only_after_dark_subtraction() -> None:
    camera = SyntheticCamera(CameraSpec(scan_shape=(1, 2), dark=True))
    thresholds = _thresholds(camera, 2)
    frame = camera.frame(0)
    assert np.array_equal(_stempy_events(frame, thresholds, camera.dark_reference()),
                          camera.planted(0))
    assert not np.array_equal(_stempy_events(frame, thresholds, None), camera.planted(0))


@pytest.mark.parametrize("lost_sector", [0, 1, 3])
def test_a_zero_filled_sector_hides_exactly_its_own_electrons(lost_sector: int) -> None:
    spec = CameraSpec(scan_shape=(2, 2), seed=5, xray_rate=1.0)
    camera = SyntheticCamera(spec)
    thresholds = _thresholds(camera, 4)
    rows = spec.sector_rows
    for index in range(spec.positions):
        frame = camera.frame(index)
        frame[lost_sector * rows:(lost_sector + 1) * rows] = 0
        planted = camera.planted(index)
        kept = planted[planted // spec.frame_shape[1] // rows != lost_sector]
        assert np.array_equal(_stempy_events(frame, thresholds, None), kept)


def test_spec_without_dark_has_no_reference_and_dark_reference_is_float32() -> None:
    assert SyntheticCamera(CameraSpec(scan_shape=(1, 1))).dark_reference() is None
    dark = SyntheticCamera(CameraSpec(scan_shape=(1, 1), dark=True)).dark_reference()
    assert dark is not None and dark.dtype == np.float32 and dark.shape == (576, 576)
    assert dark.max() > 0


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"scan_shape": (0, 4)}, "scan_shape"),
    ({"frame_shape": (16, 576)}, "frame_shape"),
    ({"sectors": 5}, "sectors=5"),
    ({"electrons_per_frame": 6000}, "electrons_per_frame=6000"),
    ({"xray_rate": 1.5}, "1.5"),
    ({"seed": -1}, "-1"),
])
def test_bad_camera_specs_are_refused_naming_the_value(kwargs: dict, named: str) -> None:
    with pytest.raises(SyntheticError, match=named):
        CameraSpec(**kwargs)


def test_indices_outside_the_scan_are_refused() -> None:
    camera = SyntheticCamera(CameraSpec(scan_shape=(2, 2)))
    with pytest.raises(SyntheticError, match="frame 4"):
        camera.frame(4)
    with pytest.raises(SyntheticError, match="sector 4"):
        camera.sector(0, 4)


@st.composite
def stream_plans(draw: st.DrawFn) -> StreamPlan:
    sectors = draw(st.sampled_from([1, 2, 4, 8]))
    spec = CameraSpec(scan_shape=draw(st.tuples(st.integers(1, 6), st.integers(1, 6))),
                      frame_shape=(576, 32), sectors=sectors)
    return StreamPlan(spec, producers=sectors, loss_rate=draw(st.floats(0.0, 0.9)),
                      duplicate_rate=draw(st.floats(0.0, 1.0)),
                      reorder_window=draw(st.integers(0, 20)), seed=draw(st.integers(0, 2**32)))


@settings(max_examples=150, deadline=None)
@given(stream_plans())
def test_plan_sends_every_kept_pair_once_and_each_duplicate_twice(plan: StreamPlan) -> None:
    spec = plan.spec
    sent: Counter[tuple[int, int]] = Counter()
    for producer in range(plan.producers):
        messages = plan.messages(producer)
        assert all(sector == producer for _, sector in messages)
        sent.update(messages)
    assert not plan.lost & plan.duplicated
    assert len(plan.lost) == round(plan.loss_rate * spec.positions * spec.sectors)
    for frame in range(spec.positions):
        for sector in range(spec.sectors):
            pair = (frame, sector)
            want = 0 if pair in plan.lost else 1 + (pair in plan.duplicated)
            assert sent[pair] == want, pair
    assert plan.total_messages == sum(sent.values())


@settings(max_examples=50, deadline=None)
@given(stream_plans())
def test_reordering_only_shuffles_within_windows(plan: StreamPlan) -> None:
    in_order = StreamPlan(plan.spec, plan.producers, plan.loss_rate, plan.duplicate_rate, 0,
                          plan.seed)
    window = max(plan.reorder_window, 1)
    for producer in range(plan.producers):
        shuffled, straight = plan.messages(producer), in_order.messages(producer)
        assert straight == sorted(straight)
        for start in range(0, len(straight), window):
            assert sorted(shuffled[start:start + window]) == straight[start:start + window]


def test_plans_are_deterministic_in_their_seed() -> None:
    spec = CameraSpec(scan_shape=(16, 16))

    def plan(seed: int) -> StreamPlan:
        return StreamPlan(spec, loss_rate=0.05, duplicate_rate=0.05, reorder_window=8, seed=seed)

    assert plan(1).messages(2) == plan(1).messages(2) and plan(1).lost == plan(1).lost
    assert plan(1).messages(2) != plan(2).messages(2)
    assert plan(1).lost != plan(2).lost and plan(1).duplicated != plan(2).duplicated
    assert len(plan(1).lost) == round(0.05 * 16 * 16 * 4)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"producers": 3}, "producers=3"),
    ({"loss_rate": 1.0}, "loss_rate"),
    ({"duplicate_rate": -0.1}, "duplicate_rate"),
    ({"reorder_window": -1}, "reorder_window"),
])
def test_bad_plans_are_refused_naming_the_value(kwargs: dict, named: str) -> None:
    with pytest.raises(SyntheticError, match=named):
        StreamPlan(CameraSpec(scan_shape=(2, 2)), **kwargs)


def test_a_producer_outside_the_plan_is_refused() -> None:
    with pytest.raises(SyntheticError, match="producer 4"):
        StreamPlan(CameraSpec(scan_shape=(2, 2))).messages(4)
