"""Seconds to make a scan's two pictures (diffraction sum, virtual bright field) from its HDF5 file.

The file is written by the consumer's writer: a scan of 576 x 576 frames whose events fall mostly
in a disk around the frame's centre (the bright-field disk) and the rest anywhere, with a number
per position that varies across the scan. Timed separately, best of --repeat: reading the events,
computing both arrays, rendering both PNGs, and a cache hit.

    .venv/bin/python bench/pictures.py [--scan 64] [--electrons 50] [--repeat 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.protocol import RoutedScanBegin, RoutedScanEnd
from controlplane.pictures import PictureCache, compute, read_events, render
from dataplane.consumer.outcome import RankParts, merge
from dataplane.consumer.scanwork import ThresholdDecision
from dataplane.consumer.writer import write_scan

FRAME_SHAPE = (576, 576)
DISK_RADIUS = 60
IN_DISK = 0.9
COUNTERS = {"rejected": {}, "expected": 0, "received": 0, "stored": 0, "duplicates": 0,
            "conflicting": 0, "unaccounted": 0, "drops_truncated": False}


def scan_events(side: int, electrons: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(side * side):
        count = int(rng.poisson(electrons))
        in_disk = int(rng.binomial(count, IN_DISK))
        angle = rng.uniform(0, 2 * np.pi, in_disk)
        r = DISK_RADIUS * np.sqrt(rng.uniform(0, 1, in_disk))
        rows = np.concatenate([288 + r * np.sin(angle), rng.uniform(0, 576, count - in_disk)])
        cols = np.concatenate([288 + r * np.cos(angle), rng.uniform(0, 576, count - in_disk)])
        rows, cols = np.clip(rows.astype(int), 0, 575), np.clip(cols.astype(int), 0, 575)
        flat = rows * FRAME_SHAPE[1] + cols
        frames.append(np.unique(flat).astype(np.uint32))
    return frames


def write(directory: Path, side: int, frames: list[np.ndarray]) -> Path:
    begin = RoutedScanBegin(v=1, session="bench", scan=0, scan_shape=(side, side),
                            frame_shape=FRAME_SHAPE, sectors=4, dtype="uint16", members=1, index=0)
    end = RoutedScanEnd(v=1, scan=0, expected=0, sent=0, accepted=0, dropped={}, drops=[],
                        drops_truncated=False)
    parts = RankParts(
        frame_ids=np.arange(len(frames), dtype=np.uint32),
        event_counts=np.array([len(f) for f in frames], dtype=np.int64),
        events=np.concatenate(frames), incomplete_frames=np.zeros(0, np.uint32),
        missing_frames=np.zeros(0, np.uint32), lost=np.zeros((0, 2), np.uint32), lost_reasons=[],
        conflicts=np.zeros((0, 2), np.uint32), counters=[COUNTERS])
    outcome = merge(begin, end, ThresholdDecision(None, "none", 0), parts)
    return write_scan(directory, outcome).path


def best(repeat: int, action: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=64, help="scan side (positions: its square)")
    parser.add_argument("--electrons", type=int, default=50, help="mean events per frame")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), args.scan, scan_events(args.scan, args.electrons, seed=1))
        events = read_events(path)
        pictures = compute(events)
        cache = PictureCache()
        cache.get(path)
        total = sum(len(f) for f in events.frames)
        print(f"scan {args.scan} x {args.scan}, frames {FRAME_SHAPE[0]} x {FRAME_SHAPE[1]}, "
              f"{total} events, file {path.stat().st_size / 2**20:.1f} MiB")
        for name, action in [("read events", lambda: read_events(path)),
                             ("compute both arrays", lambda: compute(events)),
                             ("render both PNGs", lambda: render(pictures)),
                             ("whole (uncached)", lambda: PictureCache().get(path)),
                             ("cache hit", lambda: cache.get(path))]:
            print(f"{name:>20}: {best(args.repeat, action) * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
