"""The two pictures of a scan a microscopist looks at first, from its electron-counted HDF5 file.

- The **diffraction pattern sum**: frame-shaped, the number of events on each detector pixel over
  all scan positions.
- The **virtual bright-field image**: scan-shaped, for each scan position the number of events
  inside the bright-field disk: centred on the diffraction sum's centre of mass, of radius
  ``radius`` detector pixels when the caller gives one (knowing the convergence angle and camera
  length), otherwise estimated by ``estimate_radius``: where the sum's radial profile around the
  centre falls below half of its level at the centre (the disk's edge: the bright-field disk is
  far brighter than what lies outside it). A pattern whose profile never halves shows no disk;
  then the radius is ``DEFAULT_RADIUS_FRACTION`` of the frame's smaller side.

Three layers: ``compute`` works on the event arrays alone (no I/O); ``read_events`` and
``load_pictures`` read a file in stempy's electron-counted layout (version 3, as the consumer's
writer writes it; docs/output.md), refusing files beyond ``Limits`` before the work grows with
them; ``render_png``/``PictureCache`` turn the arrays into 8-bit grayscale PNGs, the same bytes for
the same input, and keep the latest few in memory.

Shapes follow stempy: a frame's flat pixel index is ``row * frame_cols + col`` with ``frame_shape``
= (rows, cols) = the ``frames`` attributes (``Nx``, ``Ny``); ``scan_shape`` = (rows, cols) = the
``scan_positions`` attributes (``Ny``, ``Nx``); frame ``i`` belongs to scan position
``i // frames_per_position`` in row-major order.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import h5py
import numpy as np
from PIL import Image

from controlplane.errors import NoScanFile, PictureError, ScanFileChanged

LAYOUT_VERSION: Final = 3
DEFAULT_RADIUS_FRACTION: Final = 0.125
# The centre's level is the mean over this disk: a few dozen pixels, so one noisy pixel is not it.
_CENTRE_RADIUS: Final = 3.0
# With fewer, a ring's count is too noisy to compare: from this many, the 20-odd pixels of the
# first ring compared hold about 250 counts at the centre's level, and half of that is 8 sigma off.
_MIN_CENTRE_EVENTS: Final = 400
# Frames are read this many at a time, so the event bound is enforced before all are in memory.
_READ_CHUNK: Final = 4096


@dataclass(frozen=True)
class Limits:
    """How much one request may make the service read and allocate: by default a 1024 x 1024
    scan (as many scan positions, and as many frames), frames of up to 2048 x 2048 pixels, and
    about 256 MiB of events (4 bytes each).

    Frames are read ``_READ_CHUNK`` at a time and the events counted as they come, so a file
    beyond ``max_events`` is refused having read at most one chunk more than the bound."""

    max_positions: int = 1024 * 1024
    max_events: int = 64 * 1024 * 1024
    # The diffraction sum and the disk masks are as large as a frame.
    max_frame_pixels: int = 2048 * 2048


@dataclass(frozen=True)
class ScanEvents:
    """The event arrays of a scan, one per frame, with the shapes that give them meaning."""

    frames: Sequence[np.ndarray]
    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]


@dataclass(frozen=True)
class Pictures:
    diffraction: np.ndarray  # int64, frame_shape
    bright_field: np.ndarray  # int64, scan_shape
    centre: tuple[float, float]  # (row, col) of the bright-field disk, in detector pixels
    radius: float


# --- the core: arrays in, arrays out ---------------------------------------------------------


def compute(events: ScanEvents, *, radius: float | None = None) -> Pictures:
    """Both pictures of ``events``; PictureError if the shapes or indices do not fit together."""
    scan_shape = _checked_shape("scan_shape", events.scan_shape)
    frame_shape = _checked_shape("frame_shape", events.frame_shape)
    per_position = _frames_per_position(len(events.frames), scan_shape[0] * scan_shape[1])
    flat, ends = _flatten(events.frames, frame_shape[0] * frame_shape[1])
    diffraction = np.bincount(flat, minlength=frame_shape[0] * frame_shape[1]).reshape(frame_shape)
    centre = centre_of_mass(diffraction)
    radius = estimate_radius(diffraction, centre) if radius is None else _checked_radius(radius)
    inside = disk(frame_shape, centre, radius).ravel()[flat]
    per_frame = _segment_sums(inside, ends)
    bright_field = per_frame.reshape(-1, per_position).sum(axis=1).reshape(scan_shape)
    return Pictures(diffraction.astype(np.int64), bright_field, centre, radius)


def estimate_radius(diffraction: np.ndarray, centre: tuple[float, float]) -> float:
    """The bright-field disk's radius: half a pixel inside the first one-pixel ring (by rounded
    distance from ``centre``) beyond ``_CENTRE_RADIUS`` whose mean count is below half the mean
    count within ``_CENTRE_RADIUS`` of the centre. The fallback fraction of the frame when no ring
    is, or when the centre holds too few events for the comparison to be more than noise."""
    rows, cols = np.ogrid[:diffraction.shape[0], :diffraction.shape[1]]
    distance = np.hypot(rows - centre[0], cols - centre[1])
    central = diffraction[distance <= _CENTRE_RADIUS]
    rings = np.rint(distance).astype(np.intp).ravel()
    pixels = np.bincount(rings)
    counts = np.bincount(rings, weights=diffraction.ravel().astype(np.float64))
    level = float(central.mean())
    # A ring with no pixel (possible only beyond the nearest frame edge) says nothing.
    below = np.flatnonzero((pixels > 0) & (counts < pixels * (level / 2)))
    below = below[below > _CENTRE_RADIUS]
    if central.sum() < _MIN_CENTRE_EVENTS or not len(below):
        return float(DEFAULT_RADIUS_FRACTION * min(diffraction.shape))
    return float(below[0]) - 0.5


def centre_of_mass(diffraction: np.ndarray) -> tuple[float, float]:
    """(row, col) of the pattern's centre of mass; the frame's centre when it holds no event."""
    rows, cols = diffraction.shape
    total = int(diffraction.sum())
    if total == 0:
        return ((rows - 1) / 2, (cols - 1) / 2)
    row = float(diffraction.sum(axis=1) @ np.arange(rows)) / total
    col = float(diffraction.sum(axis=0) @ np.arange(cols)) / total
    return (row, col)


def disk(frame_shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean frame-shaped mask of the pixels whose centres lie within ``radius`` of ``centre``."""
    rows, cols = np.ogrid[:frame_shape[0], :frame_shape[1]]
    return np.asarray((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2)


def _checked_shape(name: str, shape: Sequence[int]) -> tuple[int, int]:
    values = tuple(shape)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
        raise PictureError(f"{name} must be two positive integers, got {values!r}")
    return (int(values[0]), int(values[1]))


def _checked_radius(radius: float) -> float:
    if not np.isfinite(radius) or radius < 0:
        raise PictureError(f"the bright-field radius must be a finite number >= 0, got {radius!r}")
    return float(radius)


def _frames_per_position(frames: int, positions: int) -> int:
    if frames < positions or frames % positions:
        raise PictureError(
            f"{frames} frames do not fill the {positions} scan positions a whole number of times")
    return frames // positions


def _flatten(frames: Sequence[np.ndarray], pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """All events in frame order as intp, and where each frame's events end."""
    for i, frame in enumerate(frames):
        if frame.ndim != 1 or frame.dtype.kind not in "iu":
            raise PictureError(f"frame {i} is not a 1-D array of integer pixel indices")
    ends = np.cumsum([len(frame) for frame in frames], dtype=np.int64)
    if not ends[-1]:
        return np.zeros(0, dtype=np.intp), ends
    flat = np.concatenate(frames)
    if flat.min() < 0 or flat.max() >= pixels:
        raise PictureError(f"a pixel index lies outside the frame's {pixels} pixels: "
                           f"found {int(flat.min())} .. {int(flat.max())}")
    return flat.astype(np.intp, copy=False), ends


def _segment_sums(inside: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """How many of each frame's events are inside, from one cumulative sum (no loop)."""
    running = np.concatenate([[0], np.cumsum(inside, dtype=np.int64)])
    return np.diff(running[np.concatenate([[0], ends])])


# --- the file --------------------------------------------------------------------------------


def load_pictures(path: Path, limits: Limits = Limits(), *,
                  radius: float | None = None) -> Pictures:
    return compute(read_events(path, limits), radius=radius)


def read_events(path: Path, limits: Limits = Limits()) -> ScanEvents:
    """The event arrays of a file in the consumer's layout; PictureError if it is not one, cannot
    be read, or holds more positions or events than ``limits`` allow."""
    try:
        with h5py.File(path, "r") as f:
            return _read(f, limits)
    except PictureError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise PictureError(f"cannot read the electron events of {path}: {exc}") from exc


def _read(f: h5py.File, limits: Limits) -> ScanEvents:
    version = f.attrs.get("version")
    if version != LAYOUT_VERSION:
        raise PictureError(f"not stempy's electron-counted layout version {LAYOUT_VERSION} "
                           f"(file version: {version})")
    frames = _dataset(f, "electron_events/frames")
    positions = _dataset(f, "electron_events/scan_positions")
    if frames.ndim != 1 or h5py.check_vlen_dtype(frames.dtype) != np.dtype(np.uint32):
        raise PictureError("electron_events/frames is not one variable-length uint32 array "
                           "per frame")
    frame_shape = _checked_shape("frame_shape", _attrs(frames, "Nx", "Ny"))
    scan_shape = _checked_shape("scan_shape", _attrs(positions, "Ny", "Nx"))
    for what, count, bound in (
            ("scan positions", scan_shape[0] * scan_shape[1], limits.max_positions),
            ("frames", frames.shape[0], limits.max_positions),
            ("pixels per frame", frame_shape[0] * frame_shape[1], limits.max_frame_pixels)):
        if count > bound:
            raise PictureError(f"the scan has {count} {what}, more than the {bound} allowed")
    return ScanEvents(_read_frames(frames, limits.max_events), scan_shape, frame_shape)


def _dataset(f: h5py.File, name: str) -> h5py.Dataset:
    node = f.get(name)
    if not isinstance(node, h5py.Dataset):
        raise PictureError(f"the file has no dataset {name}")
    return node


def _attrs(dataset: h5py.Dataset, *names: str) -> tuple[int, ...]:
    missing = [n for n in names if n not in dataset.attrs]
    if missing:
        raise PictureError(f"{dataset.name} lacks the attribute(s) {', '.join(missing)}")
    values = tuple(dataset.attrs[n] for n in names)
    if not all(np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.integer)
               for v in values):
        raise PictureError(f"{dataset.name} attributes {names} are not integers: {values!r}")
    return tuple(int(v) for v in values)


def _read_frames(frames: h5py.Dataset, max_events: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    events = 0
    for start in range(0, frames.shape[0], _READ_CHUNK):
        chunk = frames[start:start + _READ_CHUNK]
        events += sum(len(frame) for frame in chunk)
        if events > max_events:
            raise PictureError(f"the scan holds more than the {max_events} events allowed")
        out.extend(chunk)
    return out


# --- rendering -------------------------------------------------------------------------------


def diffraction_levels(diffraction: np.ndarray) -> np.ndarray:
    """8-bit grey levels on a log scale (log(1 + counts)): the central disk holds orders of
    magnitude more counts than the diffracted beams, which a linear scale would hide."""
    return _stretch(np.log1p(diffraction.astype(np.float64)), floor=0.0)


def bright_field_levels(bright_field: np.ndarray) -> np.ndarray:
    """8-bit grey levels, linear from the image's minimum (black) to its maximum (white)."""
    values = bright_field.astype(np.float64)
    return _stretch(values, floor=float(values.min()))


def _stretch(values: np.ndarray, *, floor: float) -> np.ndarray:
    span = float(values.max()) - floor
    if span <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - floor) * (255 / span)).astype(np.uint8)


def render_png(levels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a 2-D uint8 array, with no metadata (so the same levels give the
    same bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(levels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class RenderedPictures:
    diffraction_png: bytes
    bright_field_png: bytes
    pictures: Pictures


def render(pictures: Pictures) -> RenderedPictures:
    return RenderedPictures(render_png(diffraction_levels(pictures.diffraction)),
                            render_png(bright_field_levels(pictures.bright_field)), pictures)


class PictureCache:
    """The rendered pictures of the last ``max_entries`` files asked for, in this process.

    An entry is keyed by the file's resolved path, size and modification time, and the SHA-256 of
    its result record when the caller has one: a file rewritten under the same name (a replayed
    scan) is a new entry, without reading the file to find out. Least recently used entries go
    first. Safe to share between threads; two threads missing on the same file both compute it.
    """

    def __init__(self, max_entries: int = 32, limits: Limits = Limits(),
                 radius: float | None = None) -> None:
        if max_entries < 1:
            raise PictureError(f"the picture cache needs room for an entry, got {max_entries}")
        self._max_entries = max_entries
        self._limits = limits
        self._radius = radius
        self._entries: OrderedDict[tuple[str, int, int, str], RenderedPictures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, sha256: str = "") -> RenderedPictures:
        return self._cached(self._key(path, sha256), lambda: self._render(path))

    def get_within(self, root: Path, path: Path, sha256: str) -> RenderedPictures:
        """The pictures of the file ``path`` resolves to (symlinks followed) if it lies under
        ``root`` and holds what was reported, SHA-256 ``sha256``.

        NoScanFile when it is not there or lies elsewhere: refused before it is opened.
        ScanFileChanged when its contents are not the reported ones. The digest is computed only
        when the cache misses: an entry's key holds the size and modification time it was
        verified at."""
        resolved = _within(root, path)
        key = self._key(resolved, sha256)

        def verified() -> RenderedPictures:
            if file_sha256(resolved) != sha256:
                raise ScanFileChanged(f"the file of this scan, {path}, is not the one reported: "
                                      "its SHA-256 differs")
            return self._render(resolved)

        return self._cached(key, verified)

    def _render(self, path: Path) -> RenderedPictures:
        return render(load_pictures(path, self._limits, radius=self._radius))

    def _cached(self, key: tuple[str, int, int, str],
                make: Callable[[], RenderedPictures]) -> RenderedPictures:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        rendered = make()
        with self._lock:
            self._entries[key] = rendered
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return rendered

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(path: Path, sha256: str) -> tuple[str, int, int, str]:
        try:
            resolved = path.resolve(strict=True)
            stat = os.stat(resolved)
        except OSError as exc:
            raise PictureError(f"cannot read the electron events of {path}: "
                               f"{exc.strerror}") from exc
        return (str(resolved), stat.st_size, stat.st_mtime_ns, sha256)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _within(root: Path, path: Path) -> Path:
    """``path`` resolved, if it is a regular file under ``root`` (resolved too); NoScanFile
    otherwise. Resolving reads directory entries and links only, never a file's contents."""
    base = root.resolve()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise NoScanFile(f"no file for this scan: {path} is not there") from None
    if not path.is_absolute() or not resolved.is_relative_to(base) or not resolved.is_file():
        raise NoScanFile(f"no file for this scan: {path} is not a file under the jobs "
                         "directory") from None
    return resolved
