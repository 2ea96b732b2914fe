"""Electron counting: thresholds by stempy's method and event-finding kernels.

Pure functions over numpy arrays; the consumer ranks own all I/O and MPI.

Semantics follow stempy 3.6 exactly, so that events equal those of
``stempy.image.electron_count_frame`` for the same frame, dark reference and thresholds:

1. Dark subtraction happens in uint16 and wraps: ``v = (frame - trunc(dark)) mod 2**16``.
2. Thresholding: a pixel keeps its value when ``background < v < xray``, otherwise it becomes 0.
3. An event is a pixel whose thresholded value is strictly greater than every one of its existing
   8 neighbours (edge and corner pixels compare only the neighbours inside the frame).

Thresholds are computed once per scan from sample frames. Every number they need is derived from
an int64 histogram of the sample pixel values, so histograms from several ranks can be summed
(an MPI allreduce) before ``thresholds_from_histogram`` runs, and each rank gets identical
thresholds from the summed histogram.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import stempy.image
from scipy.optimize import least_squares

from dataplane.errors import DataPlaneError

PIXEL_VALUES: Final = 65_536
# stempy converts the float dark reference through a 32-bit integer; outside that range its result
# is not a subtraction at all, so such references are refused rather than imitated.
_DARK_LIMIT: Final = 2.0**31
# Eigen's Levenberg-Marquardt defaults, which stempy's fit runs with.
_FIT_TOLERANCE: Final = math.sqrt(np.finfo(np.float64).eps)
_FIT_MAX_EVALUATIONS: Final = 400
# Three fit parameters need at least three histogram bins.
_MIN_FIT_BINS: Final = 3

_NEIGHBOUR_STEPS: Final = np.array(
    [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], dtype=np.int64
)


class CountingError(DataPlaneError, ValueError):
    """Bad counting input, or thresholds that cannot be derived from the samples."""


@dataclass(frozen=True)
class Thresholds:
    """Electron-counting thresholds of one scan and the sample statistics behind them.

    A dark-subtracted pixel value ``v`` can be an electron only when ``background < v < xray``.
    """

    background: float
    xray: float
    mean: float
    std_dev: float
    optimized_mean: float
    optimized_std_dev: float
    n_samples: int
    background_n_sigma: float
    xray_n_sigma: float

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value):
                raise CountingError(f"threshold field {field.name} must be finite, got {value!r}")
        if self.n_samples < 1:
            raise CountingError(f"n_samples must be at least 1, got {self.n_samples}")

    def as_metadata(self) -> dict[str, float | int]:
        """The attributes of stempy's ``/metadata/electron_counting`` group for these thresholds."""
        return {
            "threshold_calculated": 1,
            "background_threshold": self.background,
            "x_ray_threshold": self.xray,
            "number_of_samples": self.n_samples,
            "mean": self.mean,
            "variance": self.std_dev**2,
            "std_dev": self.std_dev,
            "x_ray_threshold_n_sigma": self.xray_n_sigma,
            "background_threshold_n_sigma": self.background_n_sigma,
            "optimized_mean": self.optimized_mean,
            "optimized_std_dev": self.optimized_std_dev,
        }


def dark_offsets(dark: np.ndarray) -> np.ndarray:
    """The uint16 values stempy subtracts for a float dark reference: ``trunc(dark) mod 2**16``.

    Convert a scan's dark reference once and pass the result to ``count_frame`` and
    ``sample_histogram``; a uint16 array is already in this form and passes through unchanged.
    """
    if not isinstance(dark, np.ndarray):
        raise CountingError(f"dark reference must be a numpy array, got {type(dark).__name__}")
    if dark.dtype == np.uint16:
        return dark
    if not np.issubdtype(dark.dtype, np.number) or np.issubdtype(dark.dtype, np.complexfloating):
        raise CountingError(f"dark reference must be a real numeric array, got dtype {dark.dtype}")
    # NaN compares false, so this also refuses NaN and infinities.
    if not np.all(np.abs(dark) < _DARK_LIMIT):
        raise CountingError(
            "dark reference values must be finite and within ±2**31, got range "
            f"[{np.min(dark)}, {np.max(dark)}]"
        )
    # Float to int32 truncates toward zero; int32 to uint16 keeps the low 16 bits (mod 2**16).
    return dark.astype(np.int32).astype(np.uint16)


def sample_histogram(frames: Iterable[np.ndarray], dark: np.ndarray | None = None) -> np.ndarray:
    """Int64 histogram (length 65536) of the dark-subtracted pixel values of the sample frames."""
    offsets = None if dark is None else dark_offsets(dark)
    histogram = np.zeros(PIXEL_VALUES, dtype=np.int64)
    for frame in frames:
        values = _checked_frame(frame)
        if offsets is not None:
            values = _subtract_dark(values, _checked_dark(offsets, values.shape))
        histogram += np.bincount(values.reshape(-1), minlength=PIXEL_VALUES)
    return histogram


def thresholds_from_histogram(
    hist: np.ndarray,
    n_samples: int,
    background_n_sigma: float = 4.0,
    xray_n_sigma: float = 10.0,
) -> Thresholds:
    """Background and X-ray thresholds by stempy's method, from a summed sample histogram.

    X-ray threshold: mean + ``xray_n_sigma`` * standard deviation of all sample pixels.
    Background threshold: a Gaussian is fitted (Levenberg-Marquardt) to the histogram over
    stempy's bin range, starting from (highest count, mean, std); the threshold is
    fitted mean + ``background_n_sigma`` * |fitted std|.
    """
    counts = _checked_histogram(hist)
    if n_samples < 1:
        raise CountingError(f"n_samples must be at least 1, got {n_samples}")
    for name, value in (("background_n_sigma", background_n_sigma), ("xray_n_sigma", xray_n_sigma)):
        if not math.isfinite(value):
            raise CountingError(f"{name} must be finite, got {value!r}")
    mean, std_dev = _sample_moments(counts)
    xray = mean + xray_n_sigma * std_dev
    first_bin, last_bin = _fit_bin_range(counts, mean, std_dev, xray)
    fit_mean, fit_std = _fit_gaussian(counts, first_bin, last_bin, mean, std_dev)
    return Thresholds(
        background=fit_mean + background_n_sigma * fit_std,
        xray=xray,
        mean=mean,
        std_dev=std_dev,
        optimized_mean=fit_mean,
        optimized_std_dev=fit_std,
        n_samples=n_samples,
        background_n_sigma=background_n_sigma,
        xray_n_sigma=xray_n_sigma,
    )


def count_frame(
    frame: np.ndarray, thresholds: Thresholds, dark: np.ndarray | None = None
) -> np.ndarray:
    """Sorted uint32 flat indices (row * width + col) of the electron events of one frame.

    Only pixels above the background threshold are examined, together with their neighbours,
    so the cost is a few passes over the frame plus work proportional to the candidates.
    ``dark`` may be the float reference or, cheaper per frame, its ``dark_offsets`` form.
    """
    values = _checked_frame(frame)
    if dark is not None:
        values = _subtract_dark(values, dark_offsets(_checked_dark(dark, values.shape)))
    if values.size == 1:
        # A lone pixel has no neighbours to be beaten, so stempy reports it whatever its value.
        return np.zeros(1, dtype=np.uint32)
    lowest, ceiling = _integer_window(thresholds)
    return _local_maxima(values, lowest, ceiling)


def count_frame_stempy(
    frame: np.ndarray, thresholds: Thresholds, dark: np.ndarray | None = None
) -> np.ndarray:
    """The reference kernel: ``stempy.image.electron_count_frame`` on the same inputs."""
    values = _checked_frame(frame)
    reference = None if dark is None else _checked_dark(dark, values.shape)
    counted = stempy.image.electron_count_frame(
        values,
        darkreference=reference,
        background_threshold=thresholds.background,
        xray_threshold=thresholds.xray,
    )
    return np.asarray(counted.data[0, 0], dtype=np.uint32)


Kernel = Callable[[np.ndarray, Thresholds, np.ndarray | None], np.ndarray]

KERNELS: Final[dict[str, Kernel]] = {"vectorised": count_frame, "stempy": count_frame_stempy}
DEFAULT_KERNEL: Final = "vectorised"


def get_kernel(name: str) -> Kernel:
    """The counting kernel registered under ``name``; an unknown name is an error."""
    try:
        return KERNELS[name]
    except KeyError:
        raise CountingError(
            f"unknown counting kernel {name!r}; choose one of {sorted(KERNELS)}"
        ) from None


def _checked_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint16:
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise CountingError(f"frame must be a uint16 numpy array, got {dtype}")
    if frame.ndim != 2 or frame.size == 0:
        raise CountingError(f"frame must be a non-empty 2-D array, got shape {frame.shape}")
    return frame


def _checked_dark(dark: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(dark, np.ndarray):
        raise CountingError(f"dark reference must be a numpy array, got {type(dark).__name__}")
    if dark.shape != shape:
        raise CountingError(f"dark reference shape {dark.shape} differs from frame shape {shape}")
    return dark


def _subtract_dark(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    # uint16 array arithmetic wraps, exactly as stempy's in-place subtraction does.
    wrapped: np.ndarray = np.subtract(values, offsets, dtype=np.uint16)
    return wrapped


def _integer_window(thresholds: Thresholds) -> tuple[int, int]:
    """(lowest, ceiling): an integer pixel v passes the thresholds iff lowest < v < ceiling.

    For integers, v > background iff v > floor(background) and v < xray iff v < ceil(xray).
    ``lowest`` is at least 0 because a zero pixel never beats a neighbour.
    """
    lowest = min(max(math.floor(thresholds.background), 0), PIXEL_VALUES - 1)
    ceiling = min(max(math.ceil(thresholds.xray), 0), PIXEL_VALUES)
    return lowest, ceiling


def _local_maxima(values: np.ndarray, lowest: int, ceiling: int) -> np.ndarray:
    height, width = values.shape
    flat = values.reshape(-1)
    candidates = np.flatnonzero(flat > lowest)
    centre = flat[candidates].astype(np.int32)
    inside = centre < ceiling
    candidates, centre = candidates[inside], centre[inside]

    rows, cols = np.divmod(candidates, width)
    neighbour_rows = rows[:, None] + _NEIGHBOUR_STEPS[:, 0]
    neighbour_cols = cols[:, None] + _NEIGHBOUR_STEPS[:, 1]
    exists = (
        (neighbour_rows >= 0)
        & (neighbour_rows < height)
        & (neighbour_cols >= 0)
        & (neighbour_cols < width)
    )
    # Missing neighbours are masked by ``exists``; clipping only keeps their lookup in bounds.
    neighbours = flat.take(neighbour_rows * width + neighbour_cols, mode="clip").astype(np.int32)
    # A neighbour beats the centre only if it survives thresholding (0 otherwise) and is >= the
    # centre; since the centre passed, that means centre <= neighbour < ceiling.
    beaten: np.ndarray = (neighbours < centre[:, None]) | (neighbours >= ceiling) | ~exists
    return candidates[beaten.all(axis=1)].astype(np.uint32)


def _checked_histogram(hist: np.ndarray) -> np.ndarray:
    if not isinstance(hist, np.ndarray) or hist.shape != (PIXEL_VALUES,):
        got = getattr(hist, "shape", type(hist).__name__)
        raise CountingError(f"histogram must be an array of shape ({PIXEL_VALUES},), got {got}")
    if not np.issubdtype(hist.dtype, np.integer):
        raise CountingError(f"histogram must hold integer counts, got dtype {hist.dtype}")
    counts = hist.astype(np.int64, copy=False)
    if np.any(counts < 0):
        raise CountingError(f"histogram counts must be non-negative, found {counts.min()}")
    total = int(counts.sum())
    if total < 2:
        raise CountingError(
            f"thresholds need at least 2 sample pixels, the histogram holds {total}"
        )
    return counts


def _sample_moments(counts: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (n - 1 denominator) of the pixels behind the histogram."""
    total = int(counts.sum())
    # Integer sums are exact, so the mean is the same double stempy gets from its running sum.
    mean = int(np.dot(counts, np.arange(PIXEL_VALUES, dtype=np.int64))) / total
    present = np.flatnonzero(counts)
    deviations = present.astype(np.float64) - mean
    variance = float(np.dot(counts[present], deviations * deviations)) / (total - 1)
    return mean, math.sqrt(variance)


def _fit_bin_range(counts: np.ndarray, mean: float, std_dev: float, xray: float) -> tuple[int, int]:
    """stempy's integer bins [first, last): one per value from the minimum sample, stopping
    before the maximum sample (which therefore falls outside), cut at mean ± xray * std.

    The cut multiplies the X-ray threshold itself, not its n-sigma, by the standard deviation;
    that is stempy's arithmetic, kept so the fitted background matches it.
    """
    present = np.flatnonzero(counts)
    min_sample, max_sample = int(present[0]), int(present[-1])
    last = min(max_sample, math.trunc(mean + xray * std_dev))
    first = max(min_sample, math.trunc(mean - xray * std_dev))
    if last - first < _MIN_FIT_BINS:
        raise CountingError(
            f"sample pixel values span bins [{first}, {last}) (min {min_sample}, max "
            f"{max_sample}); a Gaussian fit needs at least {_MIN_FIT_BINS} bins"
        )
    return first, last


def _fit_gaussian(
    counts: np.ndarray, first: int, last: int, mean: float, std_dev: float
) -> tuple[float, float]:
    """Levenberg-Marquardt fit of a * exp(-(x - mu)**2 / (2 s**2)) to the histogram bins."""
    bins = np.arange(first, last, dtype=np.float64)
    heights = counts[first:last].astype(np.float64)

    def residuals(p: np.ndarray) -> np.ndarray:
        residual: np.ndarray = p[0] * np.exp(-((bins - p[1]) ** 2) / (2 * p[2] ** 2)) - heights
        return residual

    def jacobian(p: np.ndarray) -> np.ndarray:
        offset = bins - p[1]
        shape = np.exp(-(offset**2) / (2 * p[2] ** 2))
        d_mean = p[0] * offset * shape / p[2] ** 2
        return np.column_stack((shape, d_mean, offset * d_mean / p[2]))

    start = np.array([heights.max(), mean, std_dev])
    # Diverging trial steps may overflow or divide by zero; the result is checked below instead.
    with np.errstate(all="ignore"):
        try:
            fit = least_squares(
                residuals,
                start,
                jac=jacobian,
                method="lm",
                ftol=_FIT_TOLERANCE,
                xtol=_FIT_TOLERANCE,
                max_nfev=_FIT_MAX_EVALUATIONS,
            )
        except ValueError as exc:
            raise CountingError(f"Gaussian fit to the sample histogram failed: {exc}") from exc
    fit_mean, fit_std = float(fit.x[1]), abs(float(fit.x[2]))
    if fit.status <= 0 or not (math.isfinite(fit_mean) and math.isfinite(fit_std)):
        raise CountingError(
            f"Gaussian fit to the sample histogram did not converge ({fit.message}; "
            f"start {start.tolist()}, end {fit.x.tolist()})"
        )
    return fit_mean, fit_std
