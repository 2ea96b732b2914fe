"""Frames/s of the electron-counting kernels on one core, on the same 576 x 576 frames.

Frames are Gaussian noise with ~50 planted electrons each; thresholds come from the frames
themselves by stempy's method. Every kernel is checked to give identical events before timing.

    .venv/bin/python bench/counting.py [--frames 40] [--seconds 2] [--dark] [--peers DIR]

With ``--peers``, stempy is also timed by the shared peer harness on its own frames.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from peers import Peer, run_peer

from dataplane.counting import (
    DEFAULT_KERNEL,
    KERNELS,
    Thresholds,
    dark_offsets,
    sample_histogram,
    thresholds_from_histogram,
)

FRAME_SHAPE = (576, 576)
ELECTRONS_PER_FRAME = 50
STEMPY = Peer("bench_stempy_count.py", ("--method", "frame,reader_cxx"))


def synthetic_frames(count: int, seed: int) -> list[np.ndarray]:
    """Noise (mean 100, sigma 10) with electrons: a 3 x 3 halo and a brighter centre."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        frame = rng.normal(100.0, 10.0, FRAME_SHAPE)
        rows = rng.integers(1, FRAME_SHAPE[0] - 1, ELECTRONS_PER_FRAME)
        cols = rng.integers(1, FRAME_SHAPE[1] - 1, ELECTRONS_PER_FRAME)
        for row, col in zip(rows, cols, strict=True):
            frame[row - 1:row + 2, col - 1:col + 2] += 30.0
            frame[row, col] += 50.0
        frames.append(frame.clip(0, 65535).astype(np.uint16))
    return frames


def frames_per_second(kernel_name: str, frames: list[np.ndarray], thresholds: Thresholds,
                      dark: np.ndarray | None, seconds: float) -> float:
    kernel = KERNELS[kernel_name]
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for frame in frames:
            kernel(frame, thresholds, dark)
        done += len(frames)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="distinct frames to cycle through")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per kernel")
    parser.add_argument("--dark", action="store_true", help="subtract a float32 dark reference")
    parser.add_argument("--peers", type=Path, default=None,
                        help="also time stempy with the shared peer harness in DIR")
    args = parser.parse_args()

    frames = synthetic_frames(args.frames, seed=1)
    dark = (np.random.default_rng(2).normal(5.0, 2.0, FRAME_SHAPE).astype(np.float32)
            if args.dark else None)
    thresholds = thresholds_from_histogram(sample_histogram(frames, dark), len(frames))
    # The stempy kernel takes the float reference; the vectorised one its per-scan uint16 form.
    darks = {name: dark for name in KERNELS}
    if dark is not None:
        darks[DEFAULT_KERNEL] = dark_offsets(dark)

    reference = [KERNELS["stempy"](f, thresholds, darks["stempy"]) for f in frames]
    for name in KERNELS:
        for frame, expected in zip(frames, reference, strict=True):
            if not np.array_equal(KERNELS[name](frame, thresholds, darks[name]), expected):
                raise SystemExit(f"kernel {name!r} disagrees with stempy")
    events = sum(len(e) for e in reference) / len(frames)

    print(f"{len(frames)} frames {FRAME_SHAPE[0]}x{FRAME_SHAPE[1]}, dark: {dark is not None}, "
          f"background {thresholds.background:.2f}, x-ray {thresholds.xray:.2f}, "
          f"{events:.1f} events/frame")
    rates = {name: frames_per_second(name, frames, thresholds, darks[name], args.seconds)
             for name in KERNELS}
    print(f"{'kernel':<12}{'frames/s':>12}{'ms/frame':>12}{'vs stempy':>12}")
    for name, rate in rates.items():
        print(f"{name:<12}{rate:>12.0f}{1e3 / rate:>12.3f}{rate / rates['stempy']:>11.1f}x")
    if args.peers is not None:
        print_harness_stempy(args.peers)


def print_harness_stempy(directory: Path) -> None:
    results = run_peer(directory, STEMPY)
    if isinstance(results, str):
        print(f"stempy by the peer harness: skipped, {results}")
        return
    for result in results:
        if result["name"] == "stempy_count":
            print(f"stempy by the peer harness, {result['method']} on its own frames "
                  f"({float(result['events_per_frame']):.0f} events/frame): "
                  f"{float(result['frames_per_s']):.0f} frames/s")


if __name__ == "__main__":
    main()
