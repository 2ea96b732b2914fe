"""One HDF5 file per scan, in stempy's electron-counted layout plus ``/metadata/stream``.

The events are stempy's ``SparseArray``, written in the layout of its ``write_to_hdf5`` (version 3),
so ``stempy.io.load_electron_counts`` reads the file; ``/metadata/electron_counting`` holds the
thresholds under stempy's attribute names. ``/metadata/stream`` adds the streaming account: scalar
counters and small groups as attributes, and the lists that can grow with the scan (incomplete
frames, missing frames, the loss manifest) as datasets, because HDF5 attributes are limited to
64 KiB.

A file is written under a hidden temporary name in the output directory, flushed and fsynced, then
renamed, so the final name only ever holds a whole file; a write that fails (a full disk) removes
its temporary file and raises WriteError.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import stempy.io

from dataplane.consumer.errors import WriteError
from dataplane.consumer.outcome import ScanOutcome

_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class WrittenScan:
    path: Path
    sha256: str
    size: int


def scan_file_name(session: str, scan: int) -> str:
    return f"{session}_scan{scan:06d}.h5"


def write_scan(output_dir: Path, outcome: ScanOutcome) -> WrittenScan:
    """Write ``outcome`` atomically into ``output_dir``; returns the final path and its SHA-256."""
    final = output_dir / scan_file_name(outcome.begin.session, outcome.begin.scan)
    temporary = output_dir / f".{final.name}.{os.getpid()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        _write(temporary, outcome)
        digest, size = _sync_and_hash(temporary)
        os.replace(temporary, final)
        _sync_directory(output_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        left = _remove(temporary)
        raise WriteError(f"cannot write scan {outcome.begin.scan} to {final}: {exc}{left}") from exc
    return WrittenScan(final, digest, size)


def _remove(temporary: Path) -> str:
    """Remove a failed write's temporary file; what is left behind, for the error message.

    A failure here must not hide the write's own error (usually the full disk)."""
    try:
        temporary.unlink(missing_ok=True)
    except OSError as exc:
        return f" (temporary file {temporary} left behind: {exc.strerror})"
    return ""


def electron_counting_metadata(outcome: ScanOutcome) -> dict[str, Any]:
    thresholds = outcome.decision.thresholds
    if thresholds is None:
        return {"threshold_calculated": 0}
    return dict(thresholds.as_metadata())


def _write(path: Path, outcome: ScanOutcome) -> None:
    sparse = stempy.io.SparseArray(
        outcome.frame_events, scan_shape=outcome.begin.scan_shape,
        frame_shape=outcome.begin.frame_shape,
        metadata={"electron_counting": electron_counting_metadata(outcome)})
    attrs, datasets = outcome.stream_metadata()
    with h5py.File(path, "w") as f:
        _write_sparse(f, sparse)
        stream = f.require_group("metadata/stream")
        _write_attrs(stream, attrs)
        for name, data in datasets.items():
            _write_dataset(stream, name, data)


def _write_sparse(f: h5py.File, sparse: stempy.io.SparseArray) -> None:
    """stempy's ``SparseArray.write_to_hdf5`` layout, written so that equal-length frames work.

    stempy assigns the frames with ``dataset[...] = data``, which numpy turns into a 2-D array (and
    h5py refuses) whenever every frame holds the same number of events; passing the object array
    at creation keeps it one variable-length entry per frame.
    """
    f.attrs["version"] = sparse.VERSION
    events = f.require_group("electron_events")
    positions = events.create_dataset("scan_positions", data=sparse.scan_positions)
    positions.attrs["Nx"] = sparse.scan_shape[1]
    positions.attrs["Ny"] = sparse.scan_shape[0]
    frames = events.create_dataset("frames", data=sparse.data.ravel(),
                                   dtype=h5py.vlen_dtype(np.uint32))
    frames.attrs["Nx"] = sparse.frame_shape[0]
    frames.attrs["Ny"] = sparse.frame_shape[1]
    _write_attrs(f.require_group("metadata"), sparse.metadata)


def _write_attrs(group: h5py.Group, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(value, dict):
            _write_attrs(group.require_group(key), value)
        else:
            group.attrs[key] = value


def _write_dataset(group: h5py.Group, name: str, data: np.ndarray) -> None:
    if data.dtype == object:
        group.create_dataset(name, data=np.asarray(data.tolist(), dtype=h5py.string_dtype()),
                             shape=data.shape, dtype=h5py.string_dtype())
    else:
        group.create_dataset(name, data=data)


def _sync_and_hash(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _sync_directory(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
