"""Consumer-side faults on real processes: a consumer far slower than its producer, and a disk that
fills up while the consumer writes a scan's HDF5 file.

Slow consumer: a ``dsn gateway run`` process between a Producer and a PULL socket in this test that
sleeps after every message, about 100 times longer than the producer needs per sector. Nothing may
be lost, the producer must be held back to the consumer's pace, and the gateway's resident memory
must stay within what its HWM queues can hold.

Disk full: the real two-rank consumer job (``mpiexec``) writes into a small tmpfs when this test may
mount one (root with CAP_SYS_ADMIN), else under a file-size limit (RLIMIT_FSIZE) set on rank 0,
with SIGXFSZ ignored as a batch system's ``ulimit -f`` would leave it. ``DSN_TEST_DISK_FULL=rlimit``
forces the second mechanism. The scan must be reported ``failed`` with a reason, nothing may be left
under the final name or a temporary one, and the job must write the next scan once space is back.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import pytest
import test_consumer_mpi as mpi_job
import zmq
from test_consumer_mpi import Job, ScanPlan
from waiting import eventually

from common import strictyaml
from common.config import Detector
from common.keys import KeyPair
from common.protocol import Data, RoutedScanBegin, RoutedScanEnd, decode_consumer_message
from dataplane.producer import Producer
from dataplane.synthetic import CameraSpec, SyntheticCamera

DSN = Path(sys.executable).parent / "dsn"
# The consumer job's fixtures, shared: its endpoints and files, and a PUSH socket per rank.
job = mpi_job.job
pushers = mpi_job.pushers
MiB = 1024 * 1024


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- a consumer 100x slower than the producer -------------------------------------------------

SESSION = "slow"
SECTOR_SHAPE = (Detector().frame_shape[0] // Detector().sectors, Detector().frame_shape[1])
SECTOR_BYTES = Detector().sector_bytes  # the 4D Camera's 144 x 576 uint16 sectors: 162 KiB
GATEWAY_HWM = 8  # the session's limits.hwm: the gateway's egress SNDHWM and its ingress RCVHWM
PRODUCER_HWM = 1
CONSUMER_HWM = 1
CALIBRATION_SHAPE = (10, 10)  # 400 sectors at full speed: the producer's unhindered rate
SLOW_SHAPE = (5, 8)  # 160 sectors at the consumer's pace
SLOWDOWN = 100
# Per-message delay bounds, so the test stays within seconds on any machine.
DELAY_RANGE_S = (0.002, 0.08)
# Sectors outside every queue and buffer: one partly through libzmq's encoder or decoder at each
# end of the two connections, and the one the gateway's loop holds while its egress is full.
IN_FLIGHT = 5
# The gateway's own growth besides its queues: CURVE buffers, allocator slack (under 1 MB here).
RSS_ALLOWANCE = 8 * MiB


def kernel_queued_bytes(ports: set[int]) -> int:
    """Bytes in the kernel's send and receive buffers of the loopback TCP connections to or from
    ``ports``, both ends of each (autotuned, so they can hold megabytes no HWM counts)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        columns = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in columns[1:3])
        if ports & {local, remote}:
            send_queue, receive_queue = (int(size, 16) for size in columns[4].split(":"))
            total += send_queue + receive_queue
    return total


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def vm_rss(pid: int) -> int:
    """Resident set size in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """The highest RSS of a process, sampled every few milliseconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = vm_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, vm_rss(self.pid))

    def stop(self) -> int:
        """Stop sampling; the peak growth over the first sample, in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    ingress: str
    log: Path

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then the counters of the gateway's final ``stop`` log line."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=15) == 0, self.log.read_text()[-2000:]
        stop = json_lines(self.log.read_text())[-1]
        assert stop["event"] == "stop"
        return dict(stop["counters"])


@pytest.fixture
def gateway_process(
        tmp_path: Path, free_port: Callable[[], int],
        server_key_files: tuple[KeyPair, Path]) -> Iterator[Callable[..., GatewayProcess]]:
    """Starts ``dsn gateway run`` for one session with one consumer endpoint;
    kills it at the end."""
    started: list[GatewayProcess] = []

    def start(client: KeyPair, consumer: str) -> GatewayProcess:
        ingress = f"tcp://127.0.0.1:{free_port()}"
        config = tmp_path / "gateway.yaml"
        config.write_text(strictyaml.dump({
            "version": 1,
            "gateway": {"ingress": ingress, "server_secret_key_file": str(server_key_files[1]),
                        "spool_dir": None},
            "sessions": [{"id": SESSION, "client_keys": [client.public.decode()],
                          "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
                          "consumers": [consumer], "limits": {"hwm": GATEWAY_HWM}}]}))
        log = tmp_path / "gateway.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([str(DSN), "gateway", "run", "--config", str(config)],
                                       stdout=out, stderr=out)
        gateway = GatewayProcess(process, ingress, log)
        started.append(gateway)
        eventually(lambda: '"event": "start"' in log.read_text() or process.poll() is not None,
                   timeout_s=15, what="the gateway to start (or exit)")
        assert process.poll() is None, log.read_text()[-2000:]
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait()


@dataclass
class SlowConsumer:
    """A PULL socket, read in a thread, that sleeps ``delay_s`` after each data message, recording
    what arrives. (The producer sends from the test's own thread: pyzmq's zero-copy sends keep a
    per-thread socket that a short-lived thread would leave unclosed.)"""

    socket: zmq.Socket
    delay_s: float = 0.0
    received: set[tuple[int, int, int]] = field(default_factory=set)  # (scan, frame, sector)
    data_messages: int = 0
    ends: dict[int, RoutedScanEnd] = field(default_factory=dict)

    def receive_scan(self, scan: int, timeout: float) -> None:
        """Receive until ``scan``'s scan_end."""
        deadline = time.monotonic() + timeout
        while scan not in self.ends:
            assert self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))), \
                f"scan {scan}: only {self.data_messages} data messages arrived in {timeout} s"
            parts = self.socket.recv_multipart()
            message = decode_consumer_message(parts[0])
            if isinstance(message, Data):
                self.received.add((message.scan, message.frame, message.sector))
                self.data_messages += 1
                time.sleep(self.delay_s)  # the slow "processing" of this sector
            elif isinstance(message, RoutedScanEnd):
                self.ends[message.scan] = message
            else:
                assert isinstance(message, RoutedScanBegin), message


@dataclass(frozen=True)
class ProducerRun:
    """How long one scan's sends took, and, once the last one (and the scan_end) had been
    accepted: the bytes in the kernel's socket buffers, and how many of the scan's data messages
    the consumer had received (read in this order: a sector moving on in between is then counted
    as received, never as missing from both)."""

    seconds: float
    kernel_bytes: int
    received_when_done: int


def send_scan(producer: Producer, scan: int, shape: tuple[int, int], consumer: SlowConsumer,
              ports: set[int]) -> ProducerRun:
    """Send one scan while ``consumer`` receives it in a thread; waits for the consumer to finish.
    ``ports``: the gateway's ingress and the consumer's."""
    sector = np.zeros(SECTOR_SHAPE, dtype=np.uint16)
    received_before = consumer.data_messages
    receiving = ThreadPoolExecutor(max_workers=1)
    received = receiving.submit(consumer.receive_scan, scan, timeout=40)
    try:
        started = time.monotonic()
        producer.begin_scan(scan, shape, producers=1)
        for frame in range(shape[0] * shape[1]):
            for index in range(Detector().sectors):
                producer.send(frame, index, sector)
        producer.end_scan()
        seconds = time.monotonic() - started
        kernel_bytes = kernel_queued_bytes(ports)
        run = ProducerRun(seconds, kernel_bytes, consumer.data_messages - received_before)
        received.result()  # the consumer's failure, if it had one
    finally:
        receiving.shutdown(wait=False)
    return run


def sectors(scan: int, shape: tuple[int, int]) -> set[tuple[int, int, int]]:
    return {(scan, frame, index) for frame in range(shape[0] * shape[1])
            for index in range(Detector().sectors)}


@pytest.mark.timeout(60)
def test_consumer_100x_slower_loses_nothing_holds_the_producer_back_and_bounds_gateway_memory(
        gateway_process: Callable[..., GatewayProcess], zmq_context: zmq.Context,
        curve_keypair: Callable[[], KeyPair], server_key_files: tuple[KeyPair, Path]) -> None:
    pull = zmq_context.socket(zmq.PULL)
    pull.rcvhwm = CONSUMER_HWM
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    client = curve_keypair()
    gateway = gateway_process(client, f"tcp://127.0.0.1:{port}")
    rss = RssSampler(gateway.process.pid)
    consumer = SlowConsumer(pull)
    producer = Producer(gateway.ingress, server_key_files[0].public, client, hwm=PRODUCER_HWM)
    ports = {port_of(gateway.ingress), port}
    try:
        # A scan at full speed measures the rate the producer reaches through this gateway.
        fast = send_scan(producer, 1, CALIBRATION_SHAPE, consumer, ports)
        rate = len(sectors(1, CALIBRATION_SHAPE)) / fast.seconds
        consumer.delay_s = min(max(SLOWDOWN / rate, DELAY_RANGE_S[0]), DELAY_RANGE_S[1])
        slow = send_scan(producer, 2, SLOW_SHAPE, consumer, ports)
    finally:
        producer.close(linger_s=0)
        pull.close()
    growth = rss.stop()
    counters = gateway.stop()

    # No loss: every sector of both scans arrived, once, and the gateway dropped nothing.
    total = sectors(1, CALIBRATION_SHAPE) | sectors(2, SLOW_SHAPE)
    assert consumer.received == total and consumer.data_messages == len(total)
    for scan, shape in ((1, CALIBRATION_SHAPE), (2, SLOW_SHAPE)):
        end = consumer.ends[scan]
        count = len(sectors(scan, shape))
        assert (end.sent, end.accepted, end.expected, end.dropped) == (count, count, count, {})
    assert counters["drops"] == {}
    assert counters["sessions"][SESSION]["messages"] == len(total)

    # Backpressure: the producer finished only when every sector not yet at the consumer sat in
    # a bounded queue: the HWM queues, or the kernel's socket buffers as measured at that moment.
    slow_sectors = len(sectors(2, SLOW_SHAPE))
    in_queues = PRODUCER_HWM + 2 * GATEWAY_HWM + CONSUMER_HWM
    in_kernel = -(-slow.kernel_bytes // SECTOR_BYTES)
    behind = slow_sectors - slow.received_when_done
    assert behind <= in_queues + in_kernel + IN_FLIGHT, (
        f"the producer finished {behind} sectors ahead of the consumer; the HWM queues hold "
        f"{in_queues}, the kernel's buffers held {in_kernel}")

    # Memory: the gateway holds at most its ingress and egress queues' worth of sectors (its
    # ingress RCVHWM is the largest session hwm, its egress SNDHWM the session's).
    ingress_rcvhwm = egress_sndhwm = GATEWAY_HWM
    bound = (ingress_rcvhwm + egress_sndhwm) * SECTOR_BYTES + RSS_ALLOWANCE
    print(f"producer {rate:.0f} sectors/s; consumer delay {consumer.delay_s * 1000:.1f} ms/sector "
          f"({rate * consumer.delay_s:.0f}x slower); producer finished after {slow.seconds:.1f} s, "
          f"{behind} sectors ahead ({in_queues} in HWM queues, {in_kernel} in kernel buffers); "
          f"gateway RSS {rss.start / MiB:.1f} MiB + peak growth {growth / MiB:.2f} MiB "
          f"(bound {bound / MiB:.2f} MiB) over {len(total)} sectors "
          f"({len(total) * SECTOR_BYTES / MiB:.0f} MiB)")
    assert growth <= bound, f"gateway RSS grew {growth / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB"


# --- the disk fills up during the HDF5 write -------------------------------------------------

TMPFS_BYTES = 1 * MiB
# Space left when the disk is "full": room for the file's first blocks, not for the whole scan
# (the scans below make files of 20 to 30 KiB), so the write fails part-way through.
FREE_BYTES = 8 * 1024


class SmallDisk(Protocol):
    """The consumer's output directory with almost no room, and the way to make room again."""

    mechanism: str

    def fill(self, writer_pid: int) -> None: ...

    def make_room(self) -> None: ...

    def close(self) -> None: ...

    def leftovers(self) -> list[str]:
        """What is in the output directory besides the disk's own files."""
        ...


class Tmpfs:
    mechanism = "tmpfs"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.filler = directory / ".filler"
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "dsn-test",
                        str(directory)], check=True, capture_output=True)

    def fill(self, writer_pid: int) -> None:
        self.filler.write_bytes(bytes(TMPFS_BYTES - FREE_BYTES))

    def make_room(self) -> None:
        self.filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", str(self.directory)], check=True)

    def leftovers(self) -> list[str]:
        return sorted(set(os.listdir(self.directory)) - {self.filler.name})


class FileSizeLimit:
    mechanism = "rlimit"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid = 0
        self.hard = resource.RLIM_INFINITY

    def fill(self, writer_pid: int) -> None:
        # Only the soft limit: raising it again needs no privilege, the hard limit would.
        self.pid = writer_pid
        self.hard = resource.prlimit(writer_pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(writer_pid, resource.RLIMIT_FSIZE, (FREE_BYTES, self.hard))

    def make_room(self) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (self.hard, self.hard))

    def close(self) -> None:
        """The limit goes with the process."""

    def leftovers(self) -> list[str]:
        return sorted(os.listdir(self.directory))


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def small_disk(directory: Path) -> SmallDisk:
    directory.mkdir(parents=True)
    if os.environ.get("DSN_TEST_DISK_FULL") != "rlimit" and can_mount():
        try:
            return Tmpfs(directory)
        except subprocess.CalledProcessError:
            pass  # no CAP_SYS_ADMIN (an unprivileged container): use the file-size limit
    return FileSizeLimit(directory)


@pytest.fixture
def disk(job: Job) -> Iterator[SmallDisk]:
    made = small_disk(job.out)
    print(f"disk full by {made.mechanism}")
    yield made
    made.close()


@pytest.fixture
def ignore_sigxfsz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the consumer job with SIGXFSZ ignored, so exceeding RLIMIT_FSIZE fails the write
    with EFBIG instead of killing the rank (subprocess resets SIGXFSZ itself, hence a wrapper)."""
    wrapper = tmp_path / "mpiexec"
    wrapper.write_text(f"#!/bin/sh\ntrap '' XFSZ\nexec {mpi_job.MPIEXEC} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(mpi_job, "MPIEXEC", wrapper)


@pytest.fixture
def consumer_job(job: Job, disk: SmallDisk, ignore_sigxfsz: None
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """The two-rank job, for two scans, writing into ``disk``; killed if a test leaves it running
    (before the disk is unmounted)."""
    proc = mpi_job._start(mpi_job.RANKS, job.config, job.out, "--scans", "2",
                          "--result-file", str(job.result_file))
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def root_rank_pid(stderr: IO[bytes], lines: list[str]) -> int:
    """Read the job's log until rank 0 listens; returns its pid, keeps the lines read."""
    while True:
        line = stderr.readline().decode()
        assert line, "the consumer job exited before listening:\n" + "".join(lines)
        lines.append(line)
        if '"event": "listening"' in line and json.loads(line)["rank"] == 0:
            return int(json.loads(line)["pid"])


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plan(scan: int, seed: int) -> ScanPlan:
    camera = SyntheticCamera(CameraSpec(scan_shape=(8, 8), seed=seed))
    return ScanPlan(scan=scan, camera=camera, lost=set(), gateway_drops={}, duplicated=[])


@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_disk_full_during_the_write_fails_the_scan_cleanly_and_the_next_scan_is_written(
        job: Job, disk: SmallDisk, consumer_job: subprocess.Popen[bytes],
        pushers: list[zmq.Socket]) -> None:
    proc = consumer_job
    assert proc.stderr is not None
    early: list[str] = []
    disk.fill(root_rank_pid(proc.stderr, early))

    full, later = plan(1, seed=21), plan(2, seed=22)
    mpi_job._stream(pushers, [full], seed=1)
    eventually(lambda: len(results(job.result_file)) == 1 or proc.poll() is not None,
               timeout_s=45, what="the first scan's result (or the job's end)")
    assert proc.poll() is None, "the consumer job ended at the full disk"
    # Nothing under the final name, no temporary file: only what the disk itself holds.
    assert disk.leftovers() == []

    disk.make_room()
    mpi_job._stream(pushers, [later], seed=2)
    code, err = mpi_job._finish(proc, timeout=45)
    assert code == 0, err[-3000:]
    failed, written = results(job.result_file)
    assert (written["scan"], written["status"]) == (2, "complete") and "reason" not in written
    assert disk.leftovers() == [Path(written["path"]).name]
    mpi_job._check_file(Path(written["path"]), later)

    no_space = {"tmpfs": os.strerror(errno.ENOSPC), "rlimit": os.strerror(errno.EFBIG)}
    final = job.out / f"{mpi_job.SESSION}_scan{1:06d}.h5"
    assert (failed["scan"], failed["status"], failed["path"], failed["sha256"]) == (
        1, "failed", str(final), "")
    assert no_space[disk.mechanism] in failed["reason"]
    # The data had all arrived: only the file is missing.
    assert (failed["frames"], failed["received_sectors"], failed["lost_sectors"]) == (64, 256, 0)

    logs = json_lines("".join(early) + err)
    errors = [e for e in logs if e["level"] == "error"]
    assert [(e["event"], e["scan"], e["rank"]) for e in errors] == [("scan not written", 1, 0)]
    assert no_space[disk.mechanism] in errors[0]["error"]
    assert any(e["event"] == "scan written" and e["scan"] == 2 for e in logs)
