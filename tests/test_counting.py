"""Electron counting: the vectorised kernel against stempy, and thresholds against stempy's own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import stempy._image
import stempy.io
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dataplane.counting import (
    DEFAULT_KERNEL,
    KERNELS,
    PIXEL_VALUES,
    CountingError,
    Thresholds,
    count_frame,
    count_frame_stempy,
    dark_offsets,
    get_kernel,
    sample_histogram,
    thresholds_from_histogram,
)

FRAME = (576, 576)


def make_thresholds(background: float, xray: float) -> Thresholds:
    return Thresholds(
        background=background,
        xray=xray,
        mean=0.0,
        std_dev=1.0,
        optimized_mean=0.0,
        optimized_std_dev=1.0,
        n_samples=1,
        background_n_sigma=4.0,
        xray_n_sigma=10.0,
    )


def noise_frame(rng: np.random.Generator, shape: tuple[int, int], mean: float = 100.0,
                sigma: float = 10.0) -> np.ndarray:
    return rng.normal(mean, sigma, shape).clip(0, 65535).astype(np.uint16)


def plant_electrons(rng: np.random.Generator, frame: np.ndarray, count: int,
                    peak: int) -> list[int]:
    """Plant isolated electrons (a peak with a lower halo) and return their flat indices."""
    height, width = frame.shape
    planted: list[int] = []
    while len(planted) < count:
        row, col = int(rng.integers(0, height)), int(rng.integers(0, width))
        if any(abs(row - r) < 4 and abs(col - c) < 4 for r, c in
               (divmod(i, width) for i in planted)):
            continue
        halo = frame[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2]
        halo += np.uint16(peak // 3)
        frame[row, col] += np.uint16(peak - peak // 3)
        planted.append(row * width + col)
    return sorted(planted)


def events_of_both(frame: np.ndarray, thresholds: Thresholds,
                   dark: np.ndarray | None = None) -> np.ndarray:
    """The vectorised kernel's events, after checking they equal stempy's exactly."""
    ours = count_frame(frame, thresholds, dark)
    reference = count_frame_stempy(frame, thresholds, dark)
    assert ours.dtype == np.uint32
    np.testing.assert_array_equal(ours, reference)
    return ours


def stempy_thresholds(frame: np.ndarray, n_samples: int, background_n_sigma: float,
                      xray_n_sigma: float, dark: np.ndarray | None = None):
    """stempy's calculate_thresholds on a block holding only ``frame``: every random draw picks
    that frame, so the result is deterministic."""
    block = stempy.io.PyReader(frame[None], [0], (1, 1), 1, 1).read()._block
    args: list[object] = [[block]]
    if dark is not None:
        args.append(dark)
    return stempy._image.calculate_thresholds(*args, n_samples, background_n_sigma, xray_n_sigma)


# --- kernel equality with stempy -------------------------------------------------------------


def test_noise_frames_with_planted_electrons_match_stempy_and_find_every_electron() -> None:
    rng = np.random.default_rng(7)
    thresholds = make_thresholds(background=140.0, xray=260.0)
    for _ in range(12):
        frame = noise_frame(rng, FRAME)
        planted = plant_electrons(rng, frame, count=50, peak=120)
        events = events_of_both(frame, thresholds)
        assert set(planted) <= set(events.tolist())


def test_noise_frames_with_dark_reference_match_stempy() -> None:
    rng = np.random.default_rng(8)
    dark = rng.normal(20.0, 6.0, FRAME).astype(np.float32)
    thresholds = make_thresholds(background=118.3, xray=240.7)
    for _ in range(6):
        frame = noise_frame(rng, FRAME, mean=120.0)
        plant_electrons(rng, frame, count=50, peak=110)
        events = events_of_both(frame, thresholds, dark)
        assert events.size >= 50
        np.testing.assert_array_equal(count_frame(frame, thresholds, dark_offsets(dark)), events)


def test_electrons_on_borders_and_corners_are_events() -> None:
    frame = np.zeros((9, 12), dtype=np.uint16)
    corners_and_edges = [(0, 0), (0, 11), (8, 0), (8, 11), (0, 5), (8, 6), (4, 0), (5, 11)]
    for row, col in corners_and_edges:
        frame[row, col] = 50
    # A weaker neighbour next to every corner must not hide it.
    frame[0, 1] = frame[1, 10] = frame[7, 1] = frame[7, 10] = 20
    events = events_of_both(frame, make_thresholds(10.0, 100.0))
    assert events.tolist() == sorted(r * 12 + c for r, c in corners_and_edges)


def test_border_pixel_beaten_by_an_inner_neighbour_is_not_an_event() -> None:
    frame = np.zeros((5, 5), dtype=np.uint16)
    frame[0, 2], frame[1, 3] = 30, 40
    events = events_of_both(frame, make_thresholds(5.0, 100.0))
    assert events.tolist() == [1 * 5 + 3]


@pytest.mark.parametrize("second", [(2, 3), (3, 2), (3, 3), (1, 1)], ids=str)
def test_plateau_of_equal_neighbouring_maxima_is_no_event(second: tuple[int, int]) -> None:
    frame = np.zeros((5, 5), dtype=np.uint16)
    frame[2, 2] = frame[second] = 77
    events = events_of_both(frame, make_thresholds(5.0, 100.0))
    assert events.tolist() == []


def test_values_exactly_at_the_thresholds_are_excluded() -> None:
    frame = np.zeros((3, 11), dtype=np.uint16)
    # Isolated pixels (every other column) at and around each threshold.
    for col, value in zip(range(0, 11, 2), [10, 11, 19, 20, 21, 9], strict=True):
        frame[1, col] = value
    events = events_of_both(frame, make_thresholds(10.0, 20.0))
    assert events.tolist() == [11 + 2, 11 + 4]


def test_fractional_thresholds_compare_like_stempy() -> None:
    frame = np.zeros((3, 9), dtype=np.uint16)
    for col, value in zip(range(0, 9, 2), [10, 11, 19, 20, 12], strict=True):
        frame[1, col] = value
    events = events_of_both(frame, make_thresholds(10.5, 19.5))
    assert events.tolist() == [9 + 2, 9 + 4, 9 + 8]


def test_xray_pixel_is_zeroed_and_its_weaker_neighbour_becomes_the_event() -> None:
    frame = np.zeros((4, 4), dtype=np.uint16)
    frame[1, 1], frame[1, 2] = 5000, 60
    events = events_of_both(frame, make_thresholds(10.0, 1000.0))
    assert events.tolist() == [1 * 4 + 2]


def test_dark_reference_larger_than_the_frame_wraps_around() -> None:
    frame = np.full((4, 6), 50, dtype=np.uint16)
    dark = np.full(frame.shape, 50.0, dtype=np.float32)
    dark[1, 1] = 51.7  # 50 - 51 wraps to 65535
    dark[2, 4] = 60.2  # 50 - 60 wraps to 65526
    dark[3, 0] = -3.9  # a negative dark adds: 50 + 3 = 53
    wrapped = events_of_both(frame, make_thresholds(0.0, 70000.0), dark)
    assert wrapped.tolist() == [1 * 6 + 1, 2 * 6 + 4, 3 * 6 + 0]
    # With a realistic X-ray threshold the wrapped pixels are X-rays, so only the third remains.
    assert events_of_both(frame, make_thresholds(0.0, 1000.0), dark).tolist() == [3 * 6 + 0]


@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (1, 5), (5, 1), (144, 576), (576, 144)],
                         ids=str)
def test_non_square_frames_match_stempy(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    frame = rng.integers(0, 40, shape, dtype=np.uint16)
    events = events_of_both(frame, make_thresholds(20.0, 35.0))
    assert events.size > 0


def test_single_pixel_frame_is_always_an_event_as_in_stempy() -> None:
    for value in (0, 5, 500):
        frame = np.array([[value]], dtype=np.uint16)
        assert events_of_both(frame, make_thresholds(10.0, 100.0)).tolist() == [0]


@st.composite
def small_counting_case(draw: st.DrawFn) -> tuple[np.ndarray, Thresholds, np.ndarray | None]:
    shape = draw(st.tuples(st.integers(1, 7), st.integers(1, 7)))
    # A narrow value range makes plateaus and threshold ties common.
    frame = draw(hnp.arrays(np.uint16, shape, elements=st.integers(0, 14)))
    background = draw(st.floats(-3.0, 16.0))
    xray = draw(st.floats(-1.0, 18.0))
    dark = draw(st.none() | hnp.arrays(np.float32, shape, elements=st.floats(
        -20.0, 20.0, width=32)))
    return frame, make_thresholds(background, xray), dark


@settings(max_examples=400, deadline=None)
@given(small_counting_case())
def test_vectorised_kernel_equals_stempy_on_random_small_frames(
    case: tuple[np.ndarray, Thresholds, np.ndarray | None],
) -> None:
    frame, thresholds, dark = case
    events_of_both(frame, thresholds, dark)


def test_kernel_leaves_its_inputs_unchanged() -> None:
    rng = np.random.default_rng(3)
    frame = noise_frame(rng, (32, 48))
    dark = rng.normal(3.0, 1.0, frame.shape).astype(np.float32)
    frame_copy, dark_copy = frame.copy(), dark.copy()
    count_frame(frame, make_thresholds(110.0, 200.0), dark)
    np.testing.assert_array_equal(frame, frame_copy)
    np.testing.assert_array_equal(dark, dark_copy)


# --- thresholds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "n_samples", "background_n_sigma", "xray_n_sigma", "with_dark"),
    [(10.0, 1, 4.0, 10.0, False), (3.0, 3, 4.0, 10.0, False), (25.0, 2, 3.5, 8.0, False),
     (10.0, 1, 4.0, 10.0, True), (6.0, 2, 5.0, 12.0, True)],
)
def test_thresholds_equal_stempys_calculate_thresholds(
    sigma: float, n_samples: int, background_n_sigma: float, xray_n_sigma: float,
    with_dark: bool,
) -> None:
    rng = np.random.default_rng(int(sigma * 10) + n_samples)
    frame = noise_frame(rng, FRAME, mean=300.0, sigma=sigma)
    plant_electrons(rng, frame, count=50, peak=int(8 * sigma))
    dark = rng.normal(30.0, 4.0, FRAME).astype(np.float32) if with_dark else None

    hist = sample_histogram([frame] * n_samples, dark)
    ours = thresholds_from_histogram(hist, n_samples, background_n_sigma, xray_n_sigma)
    theirs = stempy_thresholds(frame, n_samples, background_n_sigma, xray_n_sigma, dark)

    assert ours.mean == pytest.approx(theirs.mean, rel=1e-12)
    assert ours.std_dev == pytest.approx(theirs.std_dev, rel=1e-9)
    assert ours.xray == pytest.approx(theirs.xray_threshold, rel=1e-9)
    assert ours.optimized_mean == pytest.approx(theirs.optimized_mean, rel=1e-7)
    assert ours.optimized_std_dev == pytest.approx(theirs.optimized_std_dev, rel=1e-6)
    assert ours.background == pytest.approx(theirs.background_threshold, rel=1e-7)
    assert ours.n_samples == n_samples


def test_thresholds_equal_stempys_when_the_maximum_sample_holds_many_pixels() -> None:
    # A saturated detector piles pixels onto the maximum value; stempy's bins stop just before the
    # maximum sample, and the fitted background depends on leaving that bin out.
    rng = np.random.default_rng(5)
    frame = noise_frame(rng, FRAME, mean=100.0, sigma=5.0).clip(0, 104)

    ours = thresholds_from_histogram(sample_histogram([frame]), n_samples=1)
    theirs = stempy_thresholds(frame, 1, 4.0, 10.0)

    assert theirs.max_sample == 104
    assert ours.background == pytest.approx(theirs.background_threshold, rel=1e-7)
    assert ours.xray == pytest.approx(theirs.xray_threshold, rel=1e-9)


def test_histograms_of_several_ranks_sum_to_the_histogram_of_all_samples() -> None:
    rng = np.random.default_rng(11)
    frames = [noise_frame(rng, (64, 80)) for _ in range(5)]
    dark = rng.normal(4.0, 2.0, (64, 80)).astype(np.float32)
    whole = sample_histogram(frames, dark)
    assert whole.dtype == np.int64 and whole.shape == (PIXEL_VALUES,)
    np.testing.assert_array_equal(
        sample_histogram(frames[:2], dark) + sample_histogram(frames[2:], dark), whole)
    assert whole.sum() == 5 * 64 * 80


def test_sample_histogram_counts_dark_subtracted_values_with_wrap_around() -> None:
    frame = np.array([[10, 10, 10]], dtype=np.uint16)
    dark = np.array([[3.9, 11.0, -2.5]], dtype=np.float32)
    hist = sample_histogram([frame], dark)
    assert np.flatnonzero(hist).tolist() == [7, 12, 65535]


def test_gaussian_histogram_recovers_its_mean_and_width() -> None:
    centre, width, height = 1000.3, 7.0, 1.0e5
    values = np.arange(PIXEL_VALUES)
    hist = np.rint(height * np.exp(-((values - centre) ** 2) / (2 * width**2))).astype(np.int64)
    pixels = np.repeat(values, hist)

    thresholds = thresholds_from_histogram(hist, n_samples=4)

    assert thresholds.mean == pytest.approx(pixels.mean(), rel=1e-12)
    assert thresholds.std_dev == pytest.approx(pixels.std(ddof=1), rel=1e-9)
    assert thresholds.xray == pytest.approx(pixels.mean() + 10 * pixels.std(ddof=1), rel=1e-9)
    assert thresholds.optimized_mean == pytest.approx(centre, abs=0.01)
    assert thresholds.optimized_std_dev == pytest.approx(width, rel=1e-3)
    assert thresholds.background == pytest.approx(centre + 4 * width, abs=0.05)


def test_background_uses_the_absolute_fitted_width_and_the_n_sigma() -> None:
    values = np.arange(PIXEL_VALUES)
    hist = np.rint(5e4 * np.exp(-((values - 200.0) ** 2) / (2 * 3.0**2))).astype(np.int64)
    four = thresholds_from_histogram(hist, 1, background_n_sigma=4.0)
    two = thresholds_from_histogram(hist, 1, background_n_sigma=2.0)
    assert four.optimized_std_dev > 0
    assert four.background - two.background == pytest.approx(2 * four.optimized_std_dev)


def test_as_metadata_uses_stempys_attribute_names() -> None:
    thresholds = Thresholds(background=140.5, xray=220.0, mean=100.0, std_dev=12.0,
                            optimized_mean=99.5, optimized_std_dev=10.25, n_samples=40,
                            background_n_sigma=4.0, xray_n_sigma=10.0)
    assert thresholds.as_metadata() == {
        "threshold_calculated": 1,
        "background_threshold": 140.5,
        "x_ray_threshold": 220.0,
        "number_of_samples": 40,
        "mean": 100.0,
        "variance": 144.0,
        "std_dev": 12.0,
        "x_ray_threshold_n_sigma": 10.0,
        "background_threshold_n_sigma": 4.0,
        "optimized_mean": 99.5,
        "optimized_std_dev": 10.25,
    }


# --- errors ----------------------------------------------------------------------------------


def test_empty_histogram_is_refused() -> None:
    with pytest.raises(CountingError, match="at least 2 sample pixels"):
        thresholds_from_histogram(sample_histogram([]), n_samples=1)


def test_too_few_distinct_values_to_fit_are_refused() -> None:
    # Values 10, 11, 12: stempy's bins stop before the maximum, leaving 2 bins for 3 parameters.
    frame = np.array([[10, 11, 12, 11]], dtype=np.uint16)
    with pytest.raises(CountingError, match=r"bins \[10, 12\)"):
        thresholds_from_histogram(sample_histogram([frame]), n_samples=1)


@pytest.mark.parametrize(
    ("hist", "n_samples", "message"),
    [(np.ones(100, dtype=np.int64), 1, "shape"),
     (np.ones(PIXEL_VALUES, dtype=np.float64), 1, "integer counts"),
     (np.full(PIXEL_VALUES, -1, dtype=np.int64), 1, "non-negative"),
     (np.ones(PIXEL_VALUES, dtype=np.int64), 0, "n_samples must be at least 1, got 0")],
)
def test_bad_histograms_are_refused_with_the_bad_value(hist: np.ndarray, n_samples: int,
                                                       message: str) -> None:
    with pytest.raises(CountingError, match=message):
        thresholds_from_histogram(hist, n_samples)


def test_bad_frames_and_dark_references_are_refused() -> None:
    thresholds = make_thresholds(10.0, 100.0)
    frame = np.zeros((4, 4), dtype=np.uint16)
    with pytest.raises(CountingError, match="float32"):
        count_frame(frame.astype(np.float32), thresholds)
    with pytest.raises(CountingError, match=r"\(4,\)"):
        count_frame(np.zeros(4, dtype=np.uint16), thresholds)
    with pytest.raises(CountingError, match=r"\(3, 4\) differs from frame shape \(4, 4\)"):
        count_frame(frame, thresholds, np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(CountingError, match=r"\(3, 4\) differs from frame shape \(4, 4\)"):
        sample_histogram([frame], np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(CountingError, match="got list"):
        count_frame(frame, thresholds, [[0.0] * 4] * 4)  # type: ignore[arg-type]
    with pytest.raises(CountingError, match="nan"):
        count_frame(frame, thresholds, np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(CountingError, match="2\\*\\*31"):
        dark_offsets(np.full((2, 2), 3e9, dtype=np.float32))


def test_non_finite_thresholds_are_refused() -> None:
    with pytest.raises(CountingError, match="background.*nan"):
        make_thresholds(math.nan, 100.0)


def test_kernel_registry_names_both_kernels_and_refuses_unknown_names() -> None:
    assert DEFAULT_KERNEL == "vectorised"
    assert get_kernel(DEFAULT_KERNEL) is count_frame
    assert KERNELS["stempy"] is count_frame_stempy
    with pytest.raises(CountingError, match="'gpu'"):
        get_kernel("gpu")
