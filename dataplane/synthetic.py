"""A seeded synthetic 4D Camera with an exact ground truth, and stream plans with seeded faults.

Frames are a bounded background plus electrons planted at known positions, designed so that the
consumer's thresholds (stempy's method, computed from any 10 or more sample frames) and stempy's
counting find exactly the planted electrons on every frame. Pixel values, in counts after dark
subtraction:

==================  ===========  ==========================================================
what                values       why
==================  ===========  ==========================================================
background          75 .. 125    integer Gaussian, mean 100, sigma 10, truncated at 2.5 sigma;
                                 the fitted background threshold lands near 140 (mean + 4 sigma)
charge sharing      130 .. 150   one neighbour of about half the electrons, always in the same
                                 sector; below every electron, so it never becomes an event
electron            155 .. 175   between the thresholds with about 1.5 sigma to spare each side
x-ray               2000 .. 4000 one pixel in ``xray_rate`` of the frames, far above the x-ray
                                 threshold (mean + 10 sigma of all sample pixels, near 195)
==================  ===========  ==========================================================

Electrons sit at Chebyshev distance >= 2 from each other, so each is a strict local maximum, and
every frame has one in a corner and one on each edge. The x-ray pixel is never adjacent to an
electron. Electrons are rare (at most one pixel in 64), so they barely move the sample mean and
sigma, and frames are at least 32 x 32, so x-rays stay far above the x-ray threshold. With
``dark``, integer per-pixel offsets are added to every pixel and ``dark_reference`` returns them,
so dark subtraction recovers the values above exactly.

Generation is fast: background comes from a noise pool drawn once per camera, read at a seeded
offset per frame, and only the planted pixels are drawn per frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np

from dataplane.errors import DataPlaneError

BACKGROUND_MEAN: Final = 100
BACKGROUND_SIGMA: Final = 10.0
BACKGROUND_MIN: Final = 75
BACKGROUND_MAX: Final = 125
SHARED_RANGE: Final = (130, 150)
ELECTRON_RANGE: Final = (155, 175)
XRAY_RANGE: Final = (2000, 4000)
SHARE_PROBABILITY: Final = 0.5
DARK_MAX: Final = 200
# Electrons must stay rare so that they barely move the sample statistics behind the thresholds.
MAX_ELECTRON_DENSITY: Final = 64
# In smaller frames a single x-ray pixel would dominate the sample sigma and so the x-ray threshold.
MIN_FRAME_SIDE: Final = 32
_POOL_SPARE: Final = 1 << 20
# Tags that keep the random streams of one seed independent of each other.
_POOL_STREAM, _DARK_STREAM, _FRAME_STREAM, _PLAN_STREAM, _REORDER_STREAM = range(5)
_NEIGHBOURS: Final = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc)


class SyntheticError(DataPlaneError, ValueError):
    """A camera spec, stream plan or index that cannot be used; the message names the value."""


@dataclass(frozen=True)
class CameraSpec:
    scan_shape: tuple[int, int] = (32, 32)
    frame_shape: tuple[int, int] = (576, 576)
    sectors: int = 4
    seed: int = 0
    electrons_per_frame: int = 40
    xray_rate: float = 0.05  # probability that a frame carries one x-ray pixel (never an event)
    dark: bool = False  # per-pixel offsets; SyntheticCamera.dark_reference() returns them

    def __post_init__(self) -> None:
        if len(self.scan_shape) != 2 or min(self.scan_shape) < 1:
            raise SyntheticError(f"scan_shape must be two positive sizes, got {self.scan_shape}")
        if len(self.frame_shape) != 2 or min(self.frame_shape) < MIN_FRAME_SIDE:
            raise SyntheticError(
                f"frame_shape must be two sizes >= {MIN_FRAME_SIDE}, got {self.frame_shape}")
        if self.sectors < 1 or self.frame_shape[0] % self.sectors:
            raise SyntheticError(
                f"sectors={self.sectors} must divide the frame's {self.frame_shape[0]} rows")
        if self.seed < 0:
            raise SyntheticError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.electrons_per_frame <= self.max_electrons:
            raise SyntheticError(
                f"electrons_per_frame={self.electrons_per_frame} must be within "
                f"0..{self.max_electrons} (one pixel in {MAX_ELECTRON_DENSITY})")
        if not 0.0 <= self.xray_rate <= 1.0:
            raise SyntheticError(f"xray_rate must be within 0..1, got {self.xray_rate}")

    @property
    def positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def sector_rows(self) -> int:
        return self.frame_shape[0] // self.sectors

    @property
    def max_electrons(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1] // MAX_ELECTRON_DENSITY

    @property
    def background_max(self) -> int:
        """Highest background value; the background threshold must lie above it."""
        return BACKGROUND_MAX

    @property
    def electron_range(self) -> tuple[int, int]:
        """Lowest and highest electron value (inclusive), between the two thresholds."""
        return ELECTRON_RANGE

    @property
    def xray_min(self) -> int:
        """Lowest x-ray value; the x-ray threshold must lie below it."""
        return XRAY_RANGE[0]


class _Layout(NamedTuple):
    """Everything drawn per frame: where the background is read and what is planted where."""

    noise_offset: int
    electrons: np.ndarray  # sorted uint32 flat indices
    electron_values: np.ndarray
    shared: np.ndarray
    shared_values: np.ndarray
    xrays: np.ndarray
    xray_values: np.ndarray


class SyntheticCamera:
    """Frames of one synthetic scan, each deterministic in ``(spec.seed, index)``."""

    def __init__(self, spec: CameraSpec) -> None:
        self.spec = spec
        rows, cols = spec.frame_shape
        self._pixels = rows * cols
        self._pool = _noise_pool(np.random.default_rng([spec.seed, _POOL_STREAM]),
                                 self._pixels + _POOL_SPARE)
        self._dark = _dark_offsets(np.random.default_rng([spec.seed, _DARK_STREAM]),
                                   spec.frame_shape) if spec.dark else None
        # The producer of each sector asks for the same frame's layout; draw it once.
        self._layout = functools.lru_cache(maxsize=4096)(self._draw_layout)

    def frame(self, index: int) -> np.ndarray:
        """The whole frame ``index``: (rows, cols) uint16."""
        return self._render(self._layout(self._checked(index)), 0, self.spec.frame_shape[0])

    def sector(self, index: int, k: int) -> np.ndarray:
        """Rows k*h .. k*h+h-1 of frame ``index`` (h = rows / sectors), C-contiguous uint16."""
        if not 0 <= k < self.spec.sectors:
            raise SyntheticError(f"sector {k} outside 0..{self.spec.sectors - 1}")
        h = self.spec.sector_rows
        return self._render(self._layout(self._checked(index)), k * h, (k + 1) * h)

    def planted(self, index: int) -> np.ndarray:
        """Sorted uint32 flat pixel indices (row * cols + col) of the electrons of frame
        ``index``."""
        return self._layout(self._checked(index)).electrons.copy()

    def dark_reference(self) -> np.ndarray | None:
        """The float32 per-pixel offsets added to every frame, or None without ``spec.dark``."""
        return None if self._dark is None else self._dark.astype(np.float32)

    def _checked(self, index: int) -> int:
        if not 0 <= index < self.spec.positions:
            raise SyntheticError(f"frame {index} outside the scan's 0..{self.spec.positions - 1}")
        return int(index)

    def _draw_layout(self, index: int) -> _Layout:
        spec = self.spec
        cols = spec.frame_shape[1]
        rng = np.random.default_rng([spec.seed, _FRAME_STREAM, index])
        noise_offset = int(rng.integers(_POOL_SPARE))
        blocked: set[tuple[int, int]] = set()
        electrons = _place_electrons(rng, spec.frame_shape, spec.electrons_per_frame, blocked)
        xrays = _place_xray(rng, spec.frame_shape, blocked) if rng.random() < spec.xray_rate else []
        order = np.argsort([r * cols + c for r, c in electrons], kind="stable")
        electron_rc = np.array(electrons, dtype=np.int64).reshape(-1, 2)[order]
        shared = _shared_neighbours(rng, electron_rc, spec.frame_shape, spec.sector_rows)
        return _Layout(
            noise_offset=noise_offset,
            electrons=(electron_rc[:, 0] * cols + electron_rc[:, 1]).astype(np.uint32),
            electron_values=_values(rng, ELECTRON_RANGE, len(electron_rc)),
            shared=shared,
            shared_values=_values(rng, SHARED_RANGE, len(shared)),
            xrays=np.array([r * cols + c for r, c in xrays], dtype=np.uint32),
            xray_values=_values(rng, XRAY_RANGE, len(xrays)),
        )

    def _render(self, layout: _Layout, row0: int, row1: int) -> np.ndarray:
        cols = self.spec.frame_shape[1]
        first, last = row0 * cols, row1 * cols
        start = layout.noise_offset + first
        image = self._pool[start:start + last - first].reshape(row1 - row0, cols).copy()
        flat = image.reshape(-1)
        for where, values in ((layout.shared, layout.shared_values),
                              (layout.electrons, layout.electron_values),
                              (layout.xrays, layout.xray_values)):
            inside = (where >= first) & (where < last)
            flat[where[inside].astype(np.int64) - first] = values[inside]
        if self._dark is not None:
            image += self._dark[row0:row1]
        return image


def _noise_pool(rng: np.random.Generator, length: int) -> np.ndarray:
    """Integer Gaussian background, truncated by rejection so the tails pile up nowhere."""
    pool = np.empty(length, dtype=np.uint16)
    filled = 0
    while filled < length:
        draw = np.rint(rng.normal(BACKGROUND_MEAN, BACKGROUND_SIGMA, length - filled + 4096))
        draw = draw[(draw >= BACKGROUND_MIN) & (draw <= BACKGROUND_MAX)][:length - filled]
        pool[filled:filled + len(draw)] = draw
        filled += len(draw)
    return pool


def _dark_offsets(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Integer offsets with column stripes, like a detector's readout pattern."""
    columns = rng.integers(0, DARK_MAX // 2, size=shape[1], dtype=np.uint16)
    pixels = rng.integers(0, DARK_MAX // 2, size=shape, dtype=np.uint16)
    return pixels + columns


def _values(rng: np.random.Generator, bounds: tuple[int, int], n: int) -> np.ndarray:
    return rng.integers(bounds[0], bounds[1] + 1, size=n, dtype=np.uint16)


def _border_candidates(rng: np.random.Generator, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """One corner and one point on each edge, so border handling is always exercised.

    Edge points keep two pixels from the corners, so none of the five can block another.
    """
    rows, cols = shape
    corner = (int(rng.integers(2)) * (rows - 1), int(rng.integers(2)) * (cols - 1))
    r = rng.integers(2, rows - 2, size=2)
    c = rng.integers(2, cols - 2, size=2)
    return [corner, (0, int(c[0])), (rows - 1, int(c[1])), (int(r[0]), 0), (int(r[1]), cols - 1)]


def _accept(point: tuple[int, int], blocked: set[tuple[int, int]]) -> bool:
    """Take ``point`` unless it is within Chebyshev distance 1 of an earlier electron."""
    if point in blocked:
        return False
    r, c = point
    blocked.add(point)
    blocked.update((r + dr, c + dc) for dr, dc in _NEIGHBOURS)
    return True


def _place_electrons(rng: np.random.Generator, shape: tuple[int, int], n: int,
                     blocked: set[tuple[int, int]]) -> list[tuple[int, int]]:
    placed = [p for p in _border_candidates(rng, shape)[:n] if _accept(p, blocked)]
    while len(placed) < n:
        # At one electron per 64 pixels at most, most random candidates are free.
        rows = rng.integers(0, shape[0], size=2 * (n - len(placed)))
        cols = rng.integers(0, shape[1], size=len(rows))
        for point in zip(rows.tolist(), cols.tolist(), strict=True):
            if len(placed) < n and _accept(point, blocked):
                placed.append(point)
    return placed


def _place_xray(rng: np.random.Generator, shape: tuple[int, int],
                blocked: set[tuple[int, int]]) -> list[tuple[int, int]]:
    while True:
        point = (int(rng.integers(shape[0])), int(rng.integers(shape[1])))
        if point not in blocked:
            return [point]


def _shared_neighbours(rng: np.random.Generator, electrons: np.ndarray, shape: tuple[int, int],
                       sector_rows: int) -> np.ndarray:
    """Flat indices of charge-sharing pixels: one neighbour of about half the electrons.

    A shared pixel stays in its electron's sector: if that sector is lost and zero-filled, the
    shared pixel goes with it instead of being left behind as a lone local maximum.
    """
    picks = rng.integers(len(_NEIGHBOURS), size=len(electrons))
    steps = np.array(_NEIGHBOURS, dtype=np.int64)[picks]
    sharing = rng.random(len(electrons)) < SHARE_PROBABILITY
    target = electrons + steps
    keep = (sharing & (target[:, 0] >= 0) & (target[:, 0] < shape[0])
            & (target[:, 1] >= 0) & (target[:, 1] < shape[1])
            & (target[:, 0] // sector_rows == electrons[:, 0] // sector_rows))
    shared: np.ndarray = target[keep, 0] * shape[1] + target[keep, 1]
    return shared.astype(np.uint32)


@dataclass(frozen=True)
class StreamPlan:
    """Who sends which (frame, sector) in which order, with seeded loss, duplicates and reordering.

    Producer p sends sector p, like the receiver servers of the 4D Camera. Loss and duplicates are
    exact fractions: round(loss_rate * frames * sectors) pairs are never sent, and
    round(duplicate_rate * sent pairs) are sent twice (the copy right after the original, before
    reordering). Reordering shuffles each producer's messages within consecutive windows.
    """

    spec: CameraSpec
    producers: int = 4
    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_window: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.producers != self.spec.sectors:
            raise SyntheticError(
                f"producers={self.producers} must equal sectors={self.spec.sectors} "
                "(one producer per sector)")
        if not 0.0 <= self.loss_rate < 1.0:
            raise SyntheticError(f"loss_rate must be within [0, 1), got {self.loss_rate}")
        if not 0.0 <= self.duplicate_rate <= 1.0:
            raise SyntheticError(f"duplicate_rate must be within [0, 1], got {self.duplicate_rate}")
        if self.reorder_window < 0:
            raise SyntheticError(f"reorder_window must be >= 0, got {self.reorder_window}")
        if self.seed < 0:
            raise SyntheticError(f"seed must be >= 0, got {self.seed}")

    def messages(self, producer: int) -> list[tuple[int, int]]:
        """(frame, sector) pairs in the order ``producer`` sends them."""
        if not 0 <= producer < self.producers:
            raise SyntheticError(f"producer {producer} outside 0..{self.producers - 1}")
        return self._schedule[producer]

    @functools.cached_property
    def lost(self) -> frozenset[tuple[int, int]]:
        """(frame, sector) pairs that no producer sends."""
        return self._pairs(self._pair_faults[0])

    @functools.cached_property
    def duplicated(self) -> frozenset[tuple[int, int]]:
        """(frame, sector) pairs sent twice."""
        return self._pairs(self._pair_faults[1])

    @property
    def total_messages(self) -> int:
        return sum(len(sends) for sends in self._schedule)

    def _pairs(self, ids: np.ndarray) -> frozenset[tuple[int, int]]:
        return frozenset(divmod(i, self.spec.sectors) for i in ids.tolist())

    @functools.cached_property
    def _pair_faults(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted pair ids (frame * sectors + sector) that are lost, and that are duplicated."""
        rng = np.random.default_rng([self.seed, _PLAN_STREAM])
        total = self.spec.positions * self.spec.sectors
        lost = np.sort(rng.choice(total, size=round(self.loss_rate * total), replace=False))
        kept = np.setdiff1d(np.arange(total), lost, assume_unique=True)
        duplicated = np.sort(rng.choice(kept, size=round(self.duplicate_rate * len(kept)),
                                        replace=False))
        return lost, duplicated

    @functools.cached_property
    def _schedule(self) -> list[list[tuple[int, int]]]:
        lost, duplicated = self._pair_faults
        sectors = self.spec.sectors
        schedule = []
        for producer in range(self.producers):
            ids = np.arange(producer, self.spec.positions * sectors, sectors)
            ids = ids[~np.isin(ids, lost, assume_unique=True)]
            ids = np.repeat(ids, 1 + np.isin(ids, duplicated, assume_unique=True))
            ids = self._reordered(ids, producer)
            schedule.append([(frame, producer) for frame in (ids // sectors).tolist()])
        return schedule

    def _reordered(self, ids: np.ndarray, producer: int) -> np.ndarray:
        if self.reorder_window < 2:
            return ids
        rng = np.random.default_rng([self.seed, _REORDER_STREAM, producer])
        window = np.arange(len(ids)) // self.reorder_window
        return ids[np.lexsort((rng.random(len(ids)), window))]
