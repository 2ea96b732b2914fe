"""A real 2-rank ``mpiexec`` consumer job, fed by the test acting as the gateway.

Two overlapping scans are pushed to the ranks' endpoints with lost, gateway-dropped and duplicated
sectors in shuffled order; the files are then read back with stempy and checked against stempy's own
``electron_count_frame`` on the same zero-filled frames, the planted electrons and exact counters.
Duplicates whose content differs from the first copy are counted, listed and leave a scan partial.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import stempy.image
import stempy.io
import yaml
import zmq

from common.ports import free_port
from common.protocol import Data, RoutedScanAbort, RoutedScanBegin, RoutedScanEnd, encode
from dataplane.synthetic import CameraSpec, SyntheticCamera

SESSION = "mpi-test"
RANKS = 2
MPIEXEC = Path(sys.executable).parent / "mpiexec"
CLIENT_KEY = zmq.curve_keypair()[0].decode()


def _write_config(tmp_path: Path, endpoints: list[str]) -> Path:
    config = {
        "version": 1,
        "gateway": {"ingress": f"tcp://127.0.0.1:{free_port()}", "server_secret_key_file": "k"},
        "sessions": [{"id": SESSION, "client_keys": [CLIENT_KEY],
                      "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
                      "consumers": endpoints, "limits": {"hwm": 64}}],
    }
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(ranks: int, config: Path, out: Path, *extra: str,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    argv = [str(MPIEXEC), "--oversubscribe", "-n", str(ranks), sys.executable, "-m",
            "dataplane.consumer", "run", "--config", str(config), "--session", SESSION,
            "--output-dir", str(out), *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=cwd)


@dataclass
class Job:
    endpoints: list[str]
    config: Path
    out: Path
    result_file: Path


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(RANKS)]
    yield Job(endpoints, _write_config(tmp_path, endpoints), tmp_path / "out",
              tmp_path / "results.jsonl")


@pytest.fixture
def pushers(job: Job) -> Iterator[list[zmq.Socket]]:
    context = zmq.Context()
    sockets = []
    for endpoint in job.endpoints:
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(endpoint)
        sockets.append(push)
    yield sockets
    for push in sockets:
        push.close(linger=0)
    context.term()


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"consumer job did not finish in {timeout}s:\n{err.decode()[-3000:]}")
    return proc.returncode, err.decode()


@dataclass
class ScanPlan:
    scan: int
    camera: SyntheticCamera
    lost: set[tuple[int, int]]
    gateway_drops: dict[tuple[int, int], str]
    duplicated: list[tuple[int, int]]

    @property
    def positions(self) -> int:
        return self.camera.spec.positions

    def messages(self) -> list[tuple[int, int]]:
        sent = [(f, s) for f in range(self.positions) for s in range(4) if (f, s) not in self.lost]
        return sent + self.duplicated

    def received_frame(self, frame: int) -> np.ndarray:
        image = self.camera.frame(frame).copy()
        rows = self.camera.spec.sector_rows
        for f, s in self.lost:
            if f == frame:
                image[s * rows:(s + 1) * rows] = 0
        return image


def _begin(plan: ScanPlan, index: int) -> bytes:
    return encode(RoutedScanBegin(v=1, session=SESSION, scan=plan.scan,
                                  scan_shape=plan.camera.spec.scan_shape, frame_shape=(576, 576),
                                  sectors=4, dtype="uint16", members=RANKS, index=index))


def _end(plan: ScanPlan, index: int, expected: int) -> bytes:
    drops = [(f, s, r) for (f, s), r in sorted(plan.gateway_drops.items()) if f % RANKS == index]
    dropped = {"invalid_header": len(plan.gateway_drops)} if plan.gateway_drops else {}
    total = len(plan.messages())
    return encode(RoutedScanEnd(v=1, scan=plan.scan, expected=expected, sent=total + len(drops),
                                accepted=total, dropped=dropped, drops=drops,
                                drops_truncated=False))


def _stream(pushers: list[zmq.Socket], plans: list[ScanPlan], seed: int) -> None:
    """Begin every scan, send all their data interleaved and shuffled, then end them in order."""
    for plan in plans:
        for index, push in enumerate(pushers):
            push.send(_begin(plan, index))
    data = [(plan, f, s) for plan in plans for f, s in plan.messages()]
    np.random.default_rng(seed).shuffle(data)  # type: ignore[arg-type]
    expected = {(plan.scan, i): 0 for plan in plans for i in range(RANKS)}
    for seq, (plan, frame, sector) in enumerate(data):
        header = encode(Data(v=1, scan=plan.scan, frame=frame, sector=sector, seq=seq))
        pushers[frame % RANKS].send_multipart([header, plan.camera.sector(frame, sector)])
        expected[(plan.scan, frame % RANKS)] += 1
    for plan in plans:
        for index, push in enumerate(pushers):
            push.send(_end(plan, index, expected[(plan.scan, index)]))


def _attr(group: h5py.Group, name: str) -> object:
    value = group.attrs[name]
    return value.decode() if isinstance(value, bytes) else value


def _check_file(path: Path, plan: ScanPlan) -> None:
    counted = stempy.io.load_electron_counts(str(path))
    assert tuple(counted.scan_shape) == plan.camera.spec.scan_shape
    with h5py.File(path, "r") as f:
        counting = dict(f["metadata/electron_counting"].attrs)
        stream = f["metadata/stream"]
        thresholds = stream["thresholds"]
        assert float(thresholds.attrs["background_threshold"]) == counting["background_threshold"]
        incomplete = np.asarray(stream["incomplete_frames"]).tolist()
        missing = np.asarray(stream["missing_frames"]).tolist()
        manifest = [tuple(p) for p in np.asarray(stream["loss_manifest/frame_sector"]).tolist()]
        reasons = [r.decode() for r in stream["loss_manifest/reason"][()]]
        attrs = {k: _attr(stream, k) for k in ("expected_sectors", "received_sectors",
                                              "duplicate_sectors", "unaccounted_sectors", "status",
                                              "session", "scan")}
        assert _attr(thresholds, "source") == "frames"
    lost_frames = sorted({f for f, _ in plan.lost})
    assert incomplete == lost_frames
    assert missing == [f for f in lost_frames if all((f, s) in plan.lost for s in range(4))]
    assert manifest == sorted(plan.lost)
    assert reasons == [plan.gateway_drops.get(p, "not_received") for p in sorted(plan.lost)]
    sent = len(plan.messages())
    assert attrs == {
        "expected_sectors": sent, "received_sectors": plan.positions * 4 - len(plan.lost),
        "duplicate_sectors": len(plan.duplicated), "unaccounted_sectors": 0,
        "status": "partial" if plan.lost else "complete", "session": SESSION, "scan": plan.scan}
    background, xray = float(counting["background_threshold"]), float(counting["x_ray_threshold"])
    for frame in range(plan.positions):
        events = np.sort(np.asarray(counted.data[frame][0], dtype=np.uint32))
        oracle = stempy.image.electron_count_frame(plan.received_frame(frame),
                                                   background_threshold=background,
                                                   xray_threshold=xray).data[0][0]
        np.testing.assert_array_equal(events, np.sort(oracle), err_msg=f"frame {frame}")
        if frame not in lost_frames:
            np.testing.assert_array_equal(events, plan.camera.planted(frame))


@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_two_rank_job_counts_overlapping_scans_exactly_and_accounts_for_every_sector(
        job: Job, pushers: list[zmq.Socket]) -> None:
    lossy = ScanPlan(
        scan=7, camera=SyntheticCamera(CameraSpec(scan_shape=(8, 8), seed=11)),
        lost={(5, 2), (10, 0), (10, 1), (13, 0), (13, 1), (13, 2), (13, 3)},
        gateway_drops={(5, 2): "invalid_header"},
        duplicated=[(4, 1), (7, 3), (20, 0)])
    clean = ScanPlan(scan=8, camera=SyntheticCamera(CameraSpec(scan_shape=(4, 4), seed=12)),
                     lost=set(), gateway_drops={}, duplicated=[(3, 0)])
    proc = _start(RANKS, job.config, job.out, "--scans", "2", "--result-file", str(job.result_file))
    _stream(pushers, [lossy, clean], seed=5)
    code, err = _finish(proc, timeout=75)
    assert code == 0, err[-3000:]

    names = {plan.scan: f"{SESSION}_scan{plan.scan:06d}.h5" for plan in (lossy, clean)}
    assert sorted(os.listdir(job.out)) == sorted(names.values())  # no temporary file left behind
    for plan in (lossy, clean):
        _check_file(job.out / names[plan.scan], plan)

    results = [json.loads(line) for line in job.result_file.read_text().splitlines()]
    assert [r["scan"] for r in results] == [7, 8]
    for result, plan in zip(results, (lossy, clean), strict=True):
        path = Path(result["path"])
        assert path == job.out / names[plan.scan]
        assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert result["status"] == ("partial" if plan.lost else "complete")
        assert result["incomplete_frames"] == len({f for f, _ in plan.lost})
        assert result["frames"] == plan.positions
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {entry["rank"] for entry in logs} == {0, 1}
    assert any(e["event"] == "scan written" and e["scan"] == 7 for e in logs)


def _other(pixels: np.ndarray) -> np.ndarray:
    """The same sector with one pixel changed: a copy that contradicts the first."""
    changed = pixels.copy()
    changed[7, 11] += 1
    return changed


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_conflicting_duplicate_is_counted_listed_and_leaves_the_scan_partial(
        job: Job, pushers: list[zmq.Socket]) -> None:
    camera = SyntheticCamera(CameraSpec(scan_shape=(4, 4), seed=13))
    # Frame 6 (rank 0) gets sector 1 again, changed, once complete; frame 9 (rank 1) gets sector
    # 0 again, changed, before it is; frame 3 gets an identical copy of sector 2.
    plan = ScanPlan(scan=11, camera=camera, lost=set(), gateway_drops={},
                    duplicated=[(6, 1), (9, 0), (3, 2)])
    proc = _start(RANKS, job.config, job.out, "--scans", "1", "--result-file", str(job.result_file))
    messages: list[tuple[int, int, np.ndarray]] = []
    for frame in range(plan.positions):
        for sector in range(4):
            messages.append((frame, sector, camera.sector(frame, sector)))
            if (frame, sector) == (9, 0):
                messages.append((9, 0, _other(camera.sector(9, 0))))
        if frame == 6:
            messages.append((6, 1, _other(camera.sector(6, 1))))
        if frame == 3:
            messages.append((3, 2, camera.sector(3, 2)))
    for index, push in enumerate(pushers):
        push.send(_begin(plan, index))
    expected = [0] * RANKS
    for seq, (frame, sector, pixels) in enumerate(messages):
        header = encode(Data(v=1, scan=plan.scan, frame=frame, sector=sector, seq=seq))
        pushers[frame % RANKS].send_multipart([header, pixels])
        expected[frame % RANKS] += 1
    for index, push in enumerate(pushers):
        push.send(_end(plan, index, expected[index]))
    code, err = _finish(proc, timeout=45)
    assert code == 0, err[-3000:]

    [result] = [json.loads(line) for line in job.result_file.read_text().splitlines()]
    conflicts = [[6, 1, "conflicting_duplicate"], [9, 0, "conflicting_duplicate"]]
    assert (result["status"], result["duplicate_sectors"], result["conflicting_duplicates"],
            result["lost_sectors"], result["incomplete_frames"]) == ("partial", 3, 2, 0, 0)
    assert (result["loss_manifest"], result["manifest_truncated"]) == (conflicts, False)
    with h5py.File(result["path"], "r") as f:
        stream = f["metadata/stream"]
        assert {k: _attr(stream, k) for k in ("status", "conflicting_duplicates",
                                              "duplicate_sectors", "lost_sectors")} == {
            "status": "partial", "conflicting_duplicates": 2, "duplicate_sectors": 3,
            "lost_sectors": 0}
        assert np.asarray(stream["loss_manifest/frame_sector"]).tolist() == [[6, 1], [9, 0]]
        assert [r.decode() for r in stream["loss_manifest/reason"][()]] == [
            "conflicting_duplicate"] * 2
    counted = stempy.io.load_electron_counts(result["path"])
    for frame in range(plan.positions):  # the first copies, counted
        events = np.sort(np.asarray(counted.data[frame][0], dtype=np.uint32))
        np.testing.assert_array_equal(events, camera.planted(frame), err_msg=f"frame {frame}")


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_relative_output_dir_gives_results_with_absolute_paths(
        job: Job, pushers: list[zmq.Socket], tmp_path: Path) -> None:
    proc = _start(RANKS, job.config, Path("out"), "--scans", "1", "--result-file",
                  str(job.result_file), cwd=tmp_path)
    plan = ScanPlan(scan=4, camera=SyntheticCamera(CameraSpec(scan_shape=(2, 2), seed=4)),
                    lost=set(), gateway_drops={}, duplicated=[])
    _stream(pushers, [plan], seed=4)
    code, err = _finish(proc, timeout=45)
    assert code == 0, err[-3000:]
    [result] = [json.loads(line) for line in job.result_file.read_text().splitlines()]
    # Useful to whoever reads the result, wherever the job ran.
    path = Path(result["path"])
    assert path.is_absolute() and path.is_file()
    assert path == (tmp_path / "out" / f"{SESSION}_scan000004.h5").resolve()
    written = [json.loads(line) for line in err.splitlines() if '"scan written"' in line]
    assert [entry["path"] for entry in written] == [result["path"]]


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_job_stops_cleanly_on_sigterm(job: Job) -> None:
    proc = _start(RANKS, job.config, job.out)
    # Wait until both ranks are listening, so the signal arrives in the receive loop. The ranks
    # are signalled as a batch system does it (mpiexec itself ends a job it is signalled to end).
    pids: list[int] = []
    assert proc.stderr is not None
    while len(pids) < RANKS:
        line = proc.stderr.readline().decode()
        assert line, "consumer job exited before listening"
        if '"event": "listening"' in line:
            pids.append(json.loads(line)["pid"])
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    code, err = _finish(proc, timeout=30)
    assert code == 0, err[-3000:]
    stopped = [json.loads(line) for line in err.splitlines() if '"consumer stopped"' in line]
    assert sorted(e["rank"] for e in stopped) == [0, 1] and all(e["signalled"] for e in stopped)


def _read_until(proc: subprocess.Popen[bytes], event: str, count: int) -> list[str]:
    """The job's log lines up to the ``count``-th ``event`` (its ranks log JSON to stderr)."""
    assert proc.stderr is not None
    lines: list[str] = []
    while sum(f'"event": "{event}"' in line for line in lines) < count:
        line = proc.stderr.readline().decode()
        assert line, "consumer job exited early:\n" + "".join(lines)[-3000:]
        lines.append(line)
    return lines


def _events(lines: list[str], event: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if f'"event": "{event}"' in line]


@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_a_signalled_job_finishes_its_scan_takes_no_new_one_and_drops_an_aborted_one(
        job: Job, pushers: list[zmq.Socket]) -> None:
    proc = _start(RANKS, job.config, job.out, "--result-file", str(job.result_file))
    kept, aborted, late = (ScanPlan(scan=n, camera=SyntheticCamera(CameraSpec((2, 2), seed=n)),
                                    lost=set(), gateway_drops={}, duplicated=[]) for n in (5, 7, 9))
    for index, push in enumerate(pushers):
        push.send(_begin(kept, index))
        push.send(_begin(aborted, index))
    for seq, (frame, sector) in enumerate(kept.messages()):
        header = encode(Data(v=1, scan=kept.scan, frame=frame, sector=sector, seq=seq))
        pushers[frame % RANKS].send_multipart([header, kept.camera.sector(frame, sector)])
    lines = _read_until(proc, "scan begins", 2 * RANKS)
    # What a cancelled local job does: mpiexec hands SIGUSR1 on to every rank (it would end them
    # at once on SIGTERM).
    os.kill(proc.pid, signal.SIGUSR1)
    lines += _read_until(proc, "draining", RANKS)
    assert all(e["scans"] == [5, 7] for e in _events(lines, "draining"))

    # Draining: a new scan is not taken, one a fellow rank left is dropped, and the scan ended
    # meanwhile is finished, written and reported; then the ranks leave.
    per_rank = kept.positions * 4 // RANKS
    for index, push in enumerate(pushers):
        push.send(_begin(late, index))
        push.send(encode(RoutedScanAbort(v=1, scan=aborted.scan, reason="consumer_gone")))
        push.send(_end(kept, index, per_rank))
    code, err = _finish(proc, timeout=45)
    lines += err.splitlines()
    assert code == 0, "".join(lines)[-3000:]
    [result] = [json.loads(line) for line in job.result_file.read_text().splitlines()]
    assert (result["scan"], result["status"], result["frames"]) == (5, "complete", 4)
    _check_file(Path(result["path"]), kept)
    refused = [e for e in _events(lines, "message dropped")
               if e["reason"] == "scan_begin_while_draining"]
    assert sorted((e["rank"], e["scan"]) for e in refused) == [(0, 9), (1, 9)]
    assert sorted((e["rank"], e["scan"]) for e in _events(lines, "scan dropped")) == [
        (0, 7), (1, 7)]
    assert sorted((e["rank"], e["scans"], e["signalled"])
                  for e in _events(lines, "consumer stopped")) == [(0, 1, True), (1, 1, True)]
    assert not _events(lines, "stopping with scans unfinished")


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_second_signal_stops_a_draining_job_at_once(job: Job,
                                                      pushers: list[zmq.Socket]) -> None:
    proc = _start(RANKS, job.config, job.out, "--drain-s", "3600", "--result-file",
                  str(job.result_file))
    plan = ScanPlan(scan=3, camera=SyntheticCamera(CameraSpec((2, 2), seed=3)), lost=set(),
                    gateway_drops={}, duplicated=[])
    for index, push in enumerate(pushers):
        push.send(_begin(plan, index))
    lines = _read_until(proc, "scan begins", RANKS)
    os.kill(proc.pid, signal.SIGUSR1)
    lines += _read_until(proc, "draining", RANKS)
    os.kill(proc.pid, signal.SIGUSR1)  # the scan never ends: only the second signal ends the job
    code, err = _finish(proc, timeout=30)
    lines += err.splitlines()
    assert code == 0, "".join(lines)[-3000:]
    assert sorted(e["rank"] for e in _events(lines, "stopping with scans unfinished")) == [0, 1]
    assert job.result_file.read_text() == ""


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_rank_count_that_differs_from_the_endpoints_is_a_clear_error(job: Job) -> None:
    proc = _start(1, job.config, job.out)
    code, err = _finish(proc, timeout=45)
    assert code == 2
    assert "lists 2 consumer endpoints but the job has 1 MPI ranks" in err


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_scan_aborted_by_the_gateway_ends_the_job_with_a_clear_error_and_no_file(
        job: Job, pushers: list[zmq.Socket]) -> None:
    proc = _start(RANKS, job.config, job.out, "--result-file", str(job.result_file))
    plan = ScanPlan(scan=9, camera=SyntheticCamera(CameraSpec(scan_shape=(2, 2), seed=3)),
                    lost=set(), gateway_drops={}, duplicated=[])
    for index, push in enumerate(pushers):
        push.send(_begin(plan, index))
    for frame in range(2):
        pushers[frame % RANKS].send_multipart([
            encode(Data(v=1, scan=plan.scan, frame=frame, sector=0, seq=frame)),
            plan.camera.sector(frame, 0)])
    abort = encode(RoutedScanAbort(v=1, scan=plan.scan, reason="consumer_gone"))
    for push in pushers:
        push.send(abort)
    code, err = _finish(proc, timeout=45)
    assert code != 0
    assert "scan 9 aborted by the gateway (consumer_gone)" in err
    assert not list(job.out.glob("*.h5"))
    assert not job.result_file.exists() or not job.result_file.read_text()  # nothing reported
