"""End to end: streaming through the gateway against the file workflow, and against counting alone.

The same synthetic 4D-STEM scan (``SyntheticCamera``, four sector producers) takes four paths on
this machine, in one run, each ending with the same HDF5 file written by the consumer's writer:

streaming      four producer threads -> ``dsn gateway run`` (static mode, CURVE) -> a 2-rank
               ``mpiexec`` consumer job -> HDF5; from the first send to the "scan written" line.
streaming plain  the same through the gateway's plaintext ingress, as for a session whose policy
               allows unencrypted transport (PLAIN + ZAP; every check but decryption).
file           the same four producer threads write their sectors to four raw files (fsynced, as
               a detector's raw capture), the files' pages are evicted from the page cache, then
               2 ranks read them back, count with the consumer's per-scan work (same assembly,
               thresholds agreed from the same samples, same kernel) and write the HDF5; from the
               first write to the file written.
counting only  the same 2 ranks doing the same work on the same sectors held in memory: no
               network, no disk (the HDF5 write included, as in the other two).

Each path's sectors are rendered before its clock starts and held in memory (``HeldCamera``), as a
detector's receiving servers hold them. Both MPI jobs are started, and wait, before their path's
clock starts. The streaming rows also
gives the CPU seconds of the producers, the gateway and the ranks. Figures only, no assertions:

    .venv/bin/python bench/end_to_end.py [--scan-shape 64x64] [--repeat 1] [--socket-buffer BYTES]
        [--lanes N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway_throughput import Tuning, cpu_seconds, start_gateway, write_config  # noqa: E402

from common.credentials import PlainCredentials  # noqa: E402
from common.keys import create_keypair, load_keypair  # noqa: E402
from common.ports import free_port  # noqa: E402
from common.protocol import VERSION, Data, RoutedScanBegin, RoutedScanEnd  # noqa: E402
from common.results import COMPLETE  # noqa: E402
from controlplane.launchers import mpi_environment, mpiexec_command  # noqa: E402
from dataplane.consumer.scanwork import CountingOptions, ScanWork, decide_thresholds  # noqa: E402
from dataplane.counting import get_kernel  # noqa: E402
from dataplane.producer import stream_synthetic  # noqa: E402
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera  # noqa: E402

if TYPE_CHECKING:
    from mpi4py import MPI

RANKS = 2
SESSION = "bench"  # the session write_config declares
SCAN = 0
RECORD_HEADER = np.dtype([("frame", "<u4"), ("sector", "<u4")])
READY_TIMEOUT_S = 60.0
GO_POLL_S = 0.005


@dataclass(frozen=True)
class Figure:
    seconds: float
    events: int
    note: str = ""


def parse_shape(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    return int(rows), int(cols)


def camera_spec(scan_shape: tuple[int, int]) -> CameraSpec:
    return CameraSpec(scan_shape=scan_shape, seed=0)


class HeldCamera(SyntheticCamera):
    """The scan's sectors rendered before any clock starts, held in memory as a detector's
    receiving servers hold them: the paths time moving and counting the data, not drawing it
    (about 85 µs of CPU per sector, which a real detector does not spend)."""

    def __init__(self, spec: CameraSpec) -> None:
        super().__init__(spec)
        self._held = {(frame, k): super(HeldCamera, self).sector(frame, k)
                      for frame in range(spec.positions) for k in range(spec.sectors)}

    def sector(self, index: int, k: int) -> np.ndarray:
        return self._held[index, k]


def sector_bytes(spec: CameraSpec) -> int:
    return spec.sector_rows * spec.frame_shape[1] * 2


# --- the ranks (run under mpiexec: ``end_to_end.py ranks ...``) ------------------------------

def owned_sectors(spec: CameraSpec, rank: int) -> Iterator[tuple[int, int]]:
    """(frame, sector) of every sector routed to ``rank``, frame by frame, as the gateway routes
    them (frame % ranks == rank)."""
    for frame in range(rank, spec.positions, RANKS):
        for sector in range(spec.sectors):
            yield frame, sector


def sectors_from_memory(spec: CameraSpec, rank: int) -> list[tuple[int, int, bytes]]:
    camera = SyntheticCamera(spec)
    return [(f, s, camera.sector(f, s).tobytes()) for f, s in owned_sectors(spec, rank)]


def sectors_from_files(spec: CameraSpec, rank: int,
                       data_dir: Path) -> Iterator[tuple[int, int, memoryview]]:
    """Each sector read from its producer's raw file, where record ``frame`` holds it."""
    record = RECORD_HEADER.itemsize + sector_bytes(spec)
    fds = [os.open(raw_file(data_dir, s), os.O_RDONLY) for s in range(spec.sectors)]
    try:
        for frame, sector in owned_sectors(spec, rank):
            data = os.pread(fds[sector], record, frame * record)
            header = np.frombuffer(data, RECORD_HEADER, count=1)[0]
            if (int(header["frame"]), int(header["sector"])) != (frame, sector):
                raise SystemExit(f"raw file {sector}: record {frame} holds {header}")
            yield frame, sector, memoryview(data)[RECORD_HEADER.itemsize:]
    finally:
        for fd in fds:
            os.close(fd)


def run_ranks(source: str, scan_shape: tuple[int, int], data_dir: Path, go: Path,
              output_dir: Path) -> None:
    """Count and write the scan as the consumer's ranks do, from ``source`` instead of a socket;
    rank 0 prints the wall-clock start and end and the events written, as one JSON line."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    spec = camera_spec(scan_shape)
    preloaded = sectors_from_memory(spec, rank) if source == "memory" else None
    while not go.exists():  # a sleeping wait: a busy MPI barrier would take a core from the writer
        time.sleep(GO_POLL_S)
    world.Barrier()
    start = time.time()
    sectors = preloaded if preloaded is not None else sectors_from_files(spec, rank, data_dir)
    result = count_and_write(world, spec, sectors, output_dir)
    if rank == 0:
        print(json.dumps({"start": start, "end": time.time(), "events": result}), flush=True)


def count_and_write(world: MPI.Comm, spec: CameraSpec,
                    sectors: list[tuple[int, int, bytes]] | Iterator[tuple[int, int, memoryview]],
                    output_dir: Path) -> int:
    """The consumer's per-scan work (``ScanWork``), threshold agreement, gather, merge and write;
    returns the events written (on rank 0; 0 elsewhere)."""
    # Imported here: importing MPI initialises it, which only the ranks may do.
    from common.logs import configure
    from dataplane.consumer.gather import gather_scan
    from dataplane.consumer.outcome import merge
    from dataplane.consumer.runner import write_result

    rank = world.Get_rank()
    begin = RoutedScanBegin(v=VERSION, session=SESSION, scan=SCAN, scan_shape=spec.scan_shape,
                            frame_shape=spec.frame_shape, sectors=spec.sectors, dtype="uint16",
                            members=RANKS, index=rank)
    options = CountingOptions(kernel=get_kernel("vectorised"))
    work = ScanWork(begin, options, RANKS)
    received = 0
    for frame, sector, payload in sectors:
        work.add(Data(v=VERSION, scan=SCAN, frame=frame, sector=sector, seq=received), payload)
        received += 1
        if work.ready_to_contribute:
            agree(world, work)
    total = spec.positions * spec.sectors
    end = RoutedScanEnd(v=VERSION, scan=SCAN, expected=received, sent=total, accepted=total,
                        dropped={}, drops=[], drops_truncated=False)
    work.close(end)
    if not work.contributed:
        agree(world, work)
    parts = gather_scan(world, work.result())
    if parts is None or work.decision is None:
        return 0
    outcome = merge(begin, end, work.decision, parts)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = write_result(output_dir, outcome, configure("dsn.bench", rank=rank))
    if result.status != COMPLETE:
        raise SystemExit(f"scan {result.status}, not complete: see the log above")
    return outcome.events


def agree(world: MPI.Comm, work: ScanWork) -> None:
    """Thresholds from every rank's samples: the consumer's agreement, as one blocking sum."""
    from mpi4py import MPI

    local = work.contribution()
    total = np.empty_like(local)
    world.Allreduce(local, total, op=MPI.SUM)
    options = work.options
    work.decide(decide_thresholds(total, options.background_n_sigma, options.xray_n_sigma))


# --- the bench process ----------------------------------------------------------------------

def raw_file(data_dir: Path, sector: int) -> Path:
    return data_dir / f"sector{sector}.raw"


def start_ranks(source: str, scan_shape: tuple[int, int], data_dir: Path, go: Path,
                output_dir: Path) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "ranks", "--source", source,
               "--scan-shape", f"{scan_shape[0]}x{scan_shape[1]}", "--data-dir", str(data_dir),
               "--go", str(go), "--output-dir", str(output_dir)]
    return subprocess.Popen(mpiexec_command(RANKS, command), env=mpi_environment(),
                            stdout=subprocess.PIPE, text=True)


def ranks_figure(job: subprocess.Popen[str], start: float | None = None) -> Figure:
    """Rank 0's line; from ``start`` (wall clock) when given, else from the ranks' own start."""
    out, _ = job.communicate(timeout=600)
    if job.returncode != 0:
        raise SystemExit(f"the ranks failed with status {job.returncode}")
    line = json.loads(out.strip().splitlines()[-1])
    return Figure(line["end"] - (line["start"] if start is None else start), line["events"])


def counting_only(scan_shape: tuple[int, int], workdir: Path) -> Figure:
    go = workdir / "go"
    go.touch()
    return ranks_figure(start_ranks("memory", scan_shape, workdir, go, workdir / "memory"))


def write_raw_files(camera: SyntheticCamera, plan: StreamPlan, data_dir: Path) -> None:
    """Four producer threads, one raw file each, every record a header and the sector."""
    def produce(producer: int) -> None:
        path = raw_file(data_dir, producer)
        with open(path, "wb", buffering=16 << 20) as f:
            for frame, sector in plan.messages(producer):
                f.write(np.array([(frame, sector)], RECORD_HEADER).tobytes())
                f.write(camera.sector(frame, sector).data)
            f.flush()
            os.fsync(f.fileno())
            # Clean after the fsync, the pages can go: the read comes from the disk, as it would
            # on the node that counts.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(plan.producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def cached_fraction(data_dir: Path, sectors: int) -> float:
    """Fraction of the raw files' pages still in the page cache (``fincore``), or NaN."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE",
                              *[str(raw_file(data_dir, s)) for s in range(sectors)]],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    pairs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    return sum(r for r, _ in pairs) / max(1, sum(s for _, s in pairs))


def file_workflow(scan_shape: tuple[int, int], workdir: Path) -> Figure:
    data_dir, go = workdir / "raw", workdir / "go-file"
    data_dir.mkdir()
    spec = camera_spec(scan_shape)
    camera = HeldCamera(spec)
    job = start_ranks("file", scan_shape, data_dir, go, workdir / "file")
    time.sleep(3.0)  # the ranks start (imports, MPI) and wait; the clock starts at the first write
    start = time.time()
    write_raw_files(camera, StreamPlan(spec), data_dir)
    written = time.time() - start
    cached = cached_fraction(data_dir, spec.sectors)
    go.touch()
    figure = ranks_figure(job, start)
    for sector in range(spec.sectors):
        raw_file(data_dir, sector).unlink()
    return Figure(figure.seconds, figure.events,
                  f"write+fsync {written:.1f} s, then read+count+HDF5 "
                  f"{figure.seconds - written:.1f} s; {cached:.0%} of the raw data cached "
                  "when read")


def await_lines(stream: IO[str], event: str, count: int) -> list[dict[str, object]]:
    """The next ``count`` JSON log lines of ``event`` on the consumer job's stderr."""
    found: list[dict[str, object]] = []
    while len(found) < count:
        line = stream.readline()
        if not line:
            raise SystemExit(f"the consumer job ended before {count} {event!r} lines")
        if f'"event": "{event}"' in line:
            found.append(json.loads(line))
    return found


def streaming(scan_shape: tuple[int, int], workdir: Path, tuning: Tuning, lanes: int) -> Figure:
    return stream_through_gateway(scan_shape, workdir, tuning, None, lanes)


def streaming_plaintext(scan_shape: tuple[int, int], workdir: Path, tuning: Tuning,
                        lanes: int) -> Figure:
    # As a session whose policy allows unencrypted transport: the gateway's plaintext ingress,
    # every check but decryption (PLAIN + ZAP admit the session by its password).
    return stream_through_gateway(scan_shape, workdir, tuning,
                                  PlainCredentials(SESSION, secrets.token_urlsafe(32)), lanes)


def stream_through_gateway(scan_shape: tuple[int, int], workdir: Path, tuning: Tuning,
                           plain: PlainCredentials | None, lanes: int) -> Figure:
    """The scan through ``lanes`` gateways (one process each, producer k on lane k mod lanes)."""
    ports = [free_port() for _ in range(RANKS)]
    client = load_keypair(workdir / "client.key_secret")
    server = load_keypair(workdir / "server.key_secret")
    written = [write_config(workdir, ports, client.public.decode(), tuning,
                            None if plain is None else plain.password) for _ in range(lanes)]
    config = written[0][0]
    result_file = workdir / "streaming.jsonl"
    consumer = subprocess.Popen(mpiexec_command(RANKS, [
        sys.executable, "-m", "dataplane.consumer", "run", "--config", str(config),
        "--session", SESSION, "--output-dir", str(workdir / "streaming"), "--scans", "1",
        "--result-file", str(result_file)]), env=mpi_environment(), stderr=subprocess.PIPE,
        text=True)
    assert consumer.stderr is not None
    ranks = [int(str(line["pid"])) for line in await_lines(consumer.stderr, "listening", RANKS)]
    gateways = [start_gateway(path) for path, _ in written]
    pids = [gateway.pid for gateway in gateways]
    try:
        spec = camera_spec(scan_shape)
        camera = HeldCamera(spec)
        cpu = StreamingCpu.now(pids, ranks)
        start = time.time()
        stream_synthetic([ingress for _, ingress in written], server.public, client, camera,
                         StreamPlan(spec), SCAN, progress=False, plain=plain)
        await_lines(consumer.stderr, "scan written", 1)
        seconds = time.time() - start
        cpu = StreamingCpu.now(pids, ranks) - cpu
        consumer.communicate(timeout=60)
    finally:
        for gateway in gateways:
            gateway.terminate()
            gateway.wait(20)
    events = json.loads(result_file.read_text().splitlines()[-1])["events"]
    return Figure(seconds, events, f"CPU s: {cpu} (of {os.cpu_count()} x {seconds:.1f} s)")


@dataclass(frozen=True)
class StreamingCpu:
    """User + system CPU seconds of each party to the streaming path (all threads)."""

    producers: float  # this process: the producer threads generate, encrypt and send
    gateway: float  # every lane's gateway
    ranks: float

    @classmethod
    def now(cls, gateways: list[int], ranks: list[int]) -> StreamingCpu:
        return cls(time.process_time(), sum(map(cpu_seconds, gateways)),
                   sum(map(cpu_seconds, ranks)))

    def __sub__(self, other: StreamingCpu) -> StreamingCpu:
        return StreamingCpu(self.producers - other.producers, self.gateway - other.gateway,
                            self.ranks - other.ranks)

    def __str__(self) -> str:
        return (f"producers {self.producers:.1f}, gateway {self.gateway:.1f}, "
                f"ranks {self.ranks:.1f}")


PathRun = Callable[[tuple[int, int], Path], Figure]
STREAMING = ("streaming", "streaming plain")


def paths(tuning: Tuning, lanes: int) -> dict[str, PathRun]:
    """Every path, the streaming ones through ``lanes`` gateways tuned so."""
    return {"streaming": functools.partial(streaming, tuning=tuning, lanes=lanes),
            "streaming plain": functools.partial(streaming_plaintext, tuning=tuning, lanes=lanes),
            "file": file_workflow, "counting only": counting_only}


def best(name: str, run: PathRun, scan_shape: tuple[int, int], workdir: Path,
         repeat: int) -> Figure:
    runs = []
    for attempt in range(repeat):
        run_dir = workdir / f"{name.replace(' ', '-')}-{attempt}"
        run_dir.mkdir()
        for key in ("client", "server"):
            create_keypair(run_dir, key)
        runs.append(run(scan_shape, run_dir))
    return min(runs, key=lambda figure: figure.seconds)


def report(spec: CameraSpec, figures: dict[str, Figure], lanes: int) -> None:
    frames = spec.positions
    gbytes = frames * spec.sectors * sector_bytes(spec) / 1e9
    print(f"{spec.scan_shape[0]}x{spec.scan_shape[1]} scan: {frames} frames of "
          f"{spec.frame_shape[0]}x{spec.frame_shape[1]}, {gbytes:.2f} GB, {RANKS} ranks, "
          f"{lanes} gateway lane{'s' if lanes > 1 else ''}, {os.cpu_count()} CPUs")
    print(f"{'path':<17}{'seconds':>9}{'frames/s':>10}{'GB/s':>7}{'events':>10}  note")
    for path, figure in figures.items():
        print(f"{path:<17}{figure.seconds:>9.2f}{frames / figure.seconds:>10,.0f}"
              f"{gbytes / figure.seconds:>7.2f}{figure.events:>10,}  {figure.note}")
    for path in STREAMING:
        stream = figures[path].seconds
        print(f"{path} vs file workflow: {figures['file'].seconds / stream:.2f}x the rate "
              "(goal >= 3)")
        print(f"{path} vs counting only: {figures['counting only'].seconds / stream:.2f}x the "
              "rate (goal >= 0.9)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scan-shape", type=parse_shape, default=(64, 64), metavar="ROWSxCOLS",
                        help="scan positions [default: 64x64, 2.7 GB]")
    parser.add_argument("--repeat", type=int, default=1, help="runs per path; the best is kept")
    parser.add_argument("--socket-buffer", type=int, default=None, metavar="BYTES",
                        help="the gateway's gateway.ingress_buffer_bytes and egress_buffer_bytes "
                             "[default: unset, the kernel's autotuning]")
    parser.add_argument("--lanes", type=int, choices=range(1, 5), default=1,
                        help="gateways the streamed scan is split over, a process each "
                             "[default: 1]")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the raw files and HDF5 files go; on a disk, not a tmpfs "
                             "[default: the system's temporary directory]")
    parser.add_argument("role", nargs="?", choices=["bench", "ranks"], default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--source", choices=["memory", "file"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "ranks":
        run_ranks(args.source, args.scan_shape, args.data_dir, args.go, args.output_dir)
        return
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-e2e-") as tmp:
        figures = {name: best(name, run, args.scan_shape, Path(tmp), args.repeat)
                   for name, run in paths(Tuning(socket_buffer=args.socket_buffer),
                                          args.lanes).items()}
    report(camera_spec(args.scan_shape), figures, args.lanes)


if __name__ == "__main__":
    main()
