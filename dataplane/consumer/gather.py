"""Gather one scan's per-rank results to the root: ``Gatherv`` for arrays, ``gather`` for counters.

Called by every rank at the same point of its sequence of finished scans (scans finish in the
order the root names, ``order``), on a communicator of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from dataplane.consumer.outcome import RankParts
from dataplane.consumer.scanwork import RankScanResult

_MPI_TYPES = {np.dtype(np.uint32): MPI.UINT32_T, np.dtype(np.int64): MPI.INT64_T,
              np.dtype(np.uint16): MPI.UINT16_T}


def gather_scan(comm: MPI.Comm, local: RankScanResult, root: int = 0) -> RankParts | None:
    """Every rank's part of one scan, on ``root``; None on the other ranks."""
    reasons = sorted({m.reason for m in local.closure.missing})
    code = {reason: i for i, reason in enumerate(reasons)}
    lost = np.array([(m.frame, m.sector) for m in local.closure.missing],
                    dtype=np.uint32).reshape(-1, 2)
    lost_codes = np.array([code[m.reason] for m in local.closure.missing], dtype=np.uint16)
    arrays: dict[str, np.ndarray] = {
        "frame_ids": local.frame_ids.astype(np.uint32),
        "event_counts": local.event_counts.astype(np.int64),
        "events": local.events.astype(np.uint32),
        "incomplete_frames": local.closure.incomplete_frames.astype(np.uint32),
        "missing_frames": local.closure.missing_frames.astype(np.uint32),
        "lost": lost.reshape(-1),
        "lost_codes": lost_codes,
        "conflicts": np.array(local.closure.conflicts, dtype=np.uint32).reshape(-1),
    }
    small = dict(local.counters, reasons=reasons,
                 lengths={name: len(array) for name, array in arrays.items()})
    counters: list[dict[str, Any]] | None = comm.gather(small, root=root)
    gathered = {name: _gatherv(comm, array, counters, name, root) for name, array in arrays.items()}
    if counters is None:
        return None
    lost_reasons = _decode_reasons(counters, gathered["lost_codes"])
    return RankParts(
        frame_ids=gathered["frame_ids"], event_counts=gathered["event_counts"],
        events=gathered["events"], incomplete_frames=gathered["incomplete_frames"],
        missing_frames=gathered["missing_frames"], lost=gathered["lost"].reshape(-1, 2),
        lost_reasons=lost_reasons, conflicts=gathered["conflicts"].reshape(-1, 2),
        counters=counters)


def _gatherv(comm: MPI.Comm, array: np.ndarray, counters: list[dict[str, Any]] | None,
             name: str, root: int) -> np.ndarray:
    array = np.ascontiguousarray(array)
    mpi_type = _MPI_TYPES[array.dtype]
    if counters is None:
        comm.Gatherv([array, mpi_type], None, root=root)
        return array
    counts = [int(c["lengths"][name]) for c in counters]
    displacements = [sum(counts[:i]) for i in range(len(counts))]
    received = np.empty(sum(counts), dtype=array.dtype)
    comm.Gatherv([array, mpi_type], [received, counts, displacements, mpi_type], root=root)
    return received


def _decode_reasons(counters: list[dict[str, Any]], codes: np.ndarray) -> list[str]:
    """Each rank coded its reasons against its own table; translate back in rank order."""
    reasons: list[str] = []
    start = 0
    for rank in counters:
        n = rank["lengths"]["lost_codes"]
        reasons.extend(rank["reasons"][c] for c in codes[start:start + n].tolist())
        start += n
    return reasons
