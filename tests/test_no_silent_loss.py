"""No silent loss on the paths beside the control plane's, with real processes: a ``dsn gateway
run --config`` process, real ``mpiexec`` consumer jobs, CURVE producers, ``kill -9``.

Across every case, each sector of a scan ends up in exactly one place: counted in an output file,
in a spool file, or listed lost with a reason; and no damaged scan is reported ``complete``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import yaml
import zmq
from cp_helpers import DSN, ControlPlane, metrics_text
from test_consumer_mpi import SESSION as CONSUMER_SESSION
from test_cp_sessions_api import WORKER_SCOPE
from test_faults_gateway import GatewayProcess
from waiting import eventually, eventually_async

from common.keys import KeyPair, create_keypair, load_keypair, load_secret_keypair
from common.ports import free_port
from common.privatefs import create_private_file
from common.protocol import Data, NcemHeader, ScanBegin, ScanEnd, encode, encode_ncem
from dataplane.producer import Producer, ProducerError, replay_spool, stream_synthetic
from dataplane.receipts import ReceiptClient, await_report
from dataplane.spool import SpoolReader, spool_name
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera
from gateway.journal import NAME as JOURNAL
from gateway.journal import read as read_journal

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(240)]

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SESSION = CONSUMER_SESSION  # the session GatewayProcess reads the metrics of
RANKS = 2
CAMERA = SyntheticCamera(CameraSpec(scan_shape=(24, 24), seed=7))
PLAN = StreamPlan(CAMERA.spec, producers=4, seed=7)
EVERY_SECTOR = {(f, s) for f in range(CAMERA.spec.positions) for s in range(CAMERA.spec.sectors)}
IDLE_S = 2


@dataclass
class StaticSite:
    """A static DSN configuration, its gateway and the keys a producer streams with."""

    directory: Path
    config: Path
    endpoint: str
    server: bytes
    client: KeyPair
    spool_dir: Path

    def job(self, name: str, *extra: str) -> ConsumerJob:
        return ConsumerJob.start(self, name, *extra)

    def stream(self, scan: int) -> object:
        return stream_synthetic(self.endpoint, self.server, self.client, CAMERA, PLAN, scan,
                                progress=False, send_timeout_s=60)

    @property
    def receipts(self) -> str:
        return str(yaml.safe_load(self.config.read_text())["gateway"]["receipts"])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``dsn producer stream`` into this site's session, as a user would run it."""
        keys = self.directory / "keys"
        return subprocess.run(
            [DSN, "producer", "stream", "--endpoint", self.endpoint, "--receipts", self.receipts,
             "--server-key", str(keys / "gateway.key"),
             "--client-key", str(keys / "producer.key_secret"), "--no-progress", *args],
            capture_output=True, text=True, timeout=120, check=False)

    def producer(self) -> Producer:
        return Producer(self.endpoint, self.server, self.client, send_timeout_s=60)


def send_frames(producer: Producer, frames: range) -> None:
    for frame in frames:
        for sector in range(CAMERA.spec.sectors):
            producer.send(frame, sector, CAMERA.sector(frame, sector))


@dataclass
class ConsumerJob:
    """``mpiexec -n 2 python -m dataplane.consumer run --config`` with its log in a file."""

    process: subprocess.Popen[bytes]
    log: Path
    results: Path

    @classmethod
    def start(cls, site: StaticSite, name: str, *extra: str) -> ConsumerJob:
        log, results = site.directory / f"{name}.log", site.directory / f"{name}.jsonl"
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        argv = [str(MPIEXEC), "--oversubscribe", "-n", str(RANKS), sys.executable, "-m",
                "dataplane.consumer", "run", "--config", str(site.config), "--session", SESSION,
                "--output-dir", str(site.directory / name), "--result-file", str(results),
                *extra]
        with log.open("wb") as out:
            process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        job = cls(process, log, results)
        eventually(lambda: len(job.pids()) == RANKS, timeout_s=60,
                   what=f"both ranks of {name} listening")
        return job

    def pids(self) -> dict[int, int]:
        """rank -> pid, from the ranks' "listening" log lines."""
        entries = [json.loads(line) for line in self.log.read_text().splitlines()
                   if '"event": "listening"' in line]
        return {entry["rank"]: entry["pid"] for entry in entries}

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"the consumer job did not end:\n{self.log.read_text()[-3000:]}")

    def result_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.results.read_text().splitlines()]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[StaticSite]:
    create_keypair(tmp_path / "keys", "producer")
    public, secret = load_secret_keypair(tmp_path / "keys" / "producer.key_secret")
    create_keypair(tmp_path / "keys", "gateway")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "version": 1,
        "gateway": {"ingress": endpoint, "receipts": f"tcp://127.0.0.1:{free_port()}",
                    "server_secret_key_file": str(tmp_path / "keys" / "gateway.key_secret"),
                    "metrics": f"127.0.0.1:{free_port()}", "spool_dir": str(tmp_path / "spool")},
        "sessions": [{"id": SESSION, "client_keys": [public.decode()],
                      "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
                      "consumers": [f"tcp://127.0.0.1:{free_port()}" for _ in range(RANKS)],
                      # Small queues: the kill lands while most of the scan is still to come;
                      # a scan without a scan_end (NCEM producers send none) ends when idle.
                      "limits": {"hwm": 16, "scan_idle_s": IDLE_S}}],
    }
    path = tmp_path / "dsn.yaml"
    path.write_text(yaml.safe_dump(config))
    yield StaticSite(tmp_path, path, endpoint, load_keypair(tmp_path / "keys" / "gateway.key")
                     .public, KeyPair(public, secret), tmp_path / "spool")


def _counted(path: Path) -> set[tuple[int, int]]:
    """The (frame, sector) pairs an output file counted: every sector but the listed lost."""
    with h5py.File(path) as f:
        lost = {tuple(pair) for pair in f["metadata/stream/loss_manifest/frame_sector"][()]
                .tolist()}
    return EVERY_SECTOR - lost


def test_a_rank_killed_mid_scan_under_a_static_gateway_is_interrupted_spooled_and_listed(
        site: StaticSite) -> None:
    gateway = GatewayProcess(site.config, _metrics(site))
    try:
        first = site.job("first")
        cut = CAMERA.spec.positions * 3 // 10
        with site.producer() as producer:
            producer.begin_scan(1, CAMERA.spec.scan_shape, producers=1)
            send_frames(producer, range(cut))
            eventually(lambda: gateway.forwarded() >= cut * CAMERA.spec.sectors, timeout_s=60,
                       what="30% of the scan forwarded")
            os.kill(first.pids()[1], signal.SIGKILL)
            # The gateway notices the broken connection and spools the rest: nothing blocks.
            send_frames(producer, range(cut, CAMERA.spec.positions))
            producer.end_scan()
        assert first.wait() != 0  # Open MPI ends the job when a rank dies

        # Every sector of scan 1: forwarded before the kill (listed lost, "consumer_gone": the
        # gateway cannot know what the dead job counted) or in the spool, never both.
        spool = site.spool_dir / spool_name(SESSION, 1)
        eventually(spool.exists, timeout_s=30, what="the interrupted scan's spool published")
        with SpoolReader(spool) as reader:
            spooled = {(msg.frame, msg.sector) for msg, _ in reader.records()}
            manifest = reader.info.manifest
        listed = {(frame, sector) for frame, sector, reason in manifest.drops
                  if reason == "consumer_gone"}
        assert listed and spooled and not listed & spooled
        assert listed | spooled == EVERY_SECTOR
        assert (manifest.sent, manifest.dropped) == (len(EVERY_SECTOR),
                                                     {"consumer_gone": len(listed)})

        # A new job on the same endpoints gets new scans, and the spool's replay counts the rest.
        second = site.job("second", "--scans", "2")
        # Until the gateway has reconnected to both ranks, a new scan would be spooled.
        eventually(lambda: metric(site, "dsn_gateway_consumers_connected") == RANKS,
                   timeout_s=30, what="the gateway connected to the new job")
        site.stream(2)
        replay_spool(spool, site.endpoint, site.server, site.client, scan=3, progress=False)
        assert second.wait() == 0, second.log.read_text()[-3000:]
        scan2, scan3 = second.result_lines()
        assert (scan2["scan"], scan2["status"], scan2["lost_sectors"]) == (2, "complete", 0)
        assert scan3["status"] == "partial"  # the listed sectors are missing from it
        assert _counted(Path(str(scan3["path"]))) == spooled
    finally:
        report = gateway.stop()
    interrupted = report["sessions"][SESSION]  # type: ignore[index]
    assert interrupted["open_scans"] == 0  # type: ignore[index]
    print(f"rank killed mid-scan, static mode: {len(EVERY_SECTOR)} sectors = {len(listed)} "
          f"listed lost + {len(spooled)} spooled, then replayed and counted")


def _metrics(site: StaticSite) -> str:
    return str(yaml.safe_load(site.config.read_text())["gateway"]["metrics"])


def metric(site: StaticSite, name: str) -> float | None:
    """The gateway's ``name`` for the session, or None before it is exported."""
    with urllib.request.urlopen(f"http://{_metrics(site)}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    found = re.search(rf'^{name}{{session="{SESSION}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_the_producer_confirms_delivery_and_a_used_scan_number_is_refused_up_front(
        site: StaticSite) -> None:
    gateway = GatewayProcess(site.config, _metrics(site))
    try:
        job = site.job("job", "--scans", "1")
        streamed = site.cli("--scan", "1", "--scan-shape", "24x24")
        assert streamed.returncode == 0, streamed.stdout + streamed.stderr
        assert (f"gateway: scan 1 forwarded: {len(EVERY_SECTOR)} sent, {len(EVERY_SECTOR)} "
                "forwarded, 0 spooled, 0 lost") in streamed.stdout
        assert job.wait() == 0, job.log.read_text()[-3000:]
        [result] = job.result_lines()
        assert (result["scan"], result["status"]) == (1, "complete")

        # The same scan number again: refused before anything is sent.
        again = site.cli("--scan", "1", "--scan-shape", "24x24")
        assert again.returncode == 1
        assert "scan 1 of this session is closed already at the gateway" in again.stderr
        assert metric(site, "dsn_gateway_messages_total") == len(EVERY_SECTOR)
        # A producer that does not ask first learns it from the receipt: refused, and why.
        stream_synthetic(site.endpoint, site.server, site.client, CAMERA, PLAN, 1,
                         progress=False, send_timeout_s=60)
        with ReceiptClient(site.receipts, site.server, site.client) as receipts:
            with pytest.raises(ProducerError, match=r"refused scan 1 \(scan_closed\)"):
                await_report(receipts, 1, timeout_s=10)
    finally:
        gateway.stop()


async def test_a_session_without_consumers_is_ended_only_once_the_gateway_has_spooled_its_scan(
        served: tuple[ControlPlane, str, Path], tmp_path: Path) -> None:
    cp, metrics, spool_dir = served
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    create_private_file(tmp_path / "project.token", token.encode())
    await eventually_async(lambda: "dsn_gateway_consumers" in metrics_text(metrics),
                           timeout_s=60, what="the gateway to serve")
    streamed = await asyncio.to_thread(subprocess.run, [
        DSN, "producer", "stream", "--controlplane", cp.settings.base_url, "--project", "alpha",
        "--project-token-file", str(tmp_path / "project.token"), "--scan-shape", "8x8",
        "--end-session", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    session = streamed.stdout.split()[1]
    spool = spool_dir / spool_name(session, 0)
    assert f"session {session} has no consumer yet" in streamed.stdout
    assert ("gateway: scan 0 spooled (no_consumers): 256 sent, 0 forwarded, 256 spooled, "
            "0 lost") in streamed.stdout
    assert f"spooled to {spool}" in streamed.stdout
    assert streamed.stdout.rstrip().endswith(f"session {session} ended")
    # Ended after the gateway had read everything: nothing dropped for want of a session.
    assert 'reason="unauthenticated"' not in metrics_text(metrics)
    with SpoolReader(spool) as reader:
        assert reader.info.records == 256
    # The control plane lists the spooled scan with its file, where a replay can find it.
    listed = await (await cp.call("GET", f"/api/v1/scans?session={session}", token)).json()
    [record] = await eventually_async(lambda: listed["items"] or None, timeout_s=1,
                                      what="the spooled scan listed")
    assert (record["source"], record["status"], record["path"], record["spooled_sectors"],
            record["lost_sectors"]) == ("gateway", "spooled", str(spool), 256, 0)


def ncem_message(scan: int, frame: int, sector: int,
                 frame_number: int | None = None) -> list[bytes]:
    """A 4D Camera message as the NCEM producers send it: an 8-integer header and the sector."""
    rows, cols = CAMERA.spec.scan_shape
    row, col = divmod(frame, cols)
    header = NcemHeader(scan_number=scan, frame_number=frame if frame_number is None
                        else frame_number, positions_per_row=cols, rows=rows, x_in_row=col,
                        row_in_scan=row, thread_id=sector, module=sector)
    return [encode_ncem(header), CAMERA.sector(frame, sector).tobytes()]


def test_ncem_producers_stream_unchanged_and_a_frame_number_off_its_position_is_listed(
        site: StaticSite) -> None:
    gateway = GatewayProcess(site.config, _metrics(site))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    try:
        job = site.job("job", "--scans", "2")
        push.curve_secretkey, push.curve_publickey = site.client.secret, site.client.public
        push.curve_serverkey = site.server
        push.connect(site.endpoint)
        # Scan 1 whole: it opens with its first message and closes with its last.
        for frame, sector in sorted(EVERY_SECTOR):
            push.send_multipart(ncem_message(1, frame, sector))
        # Scan 2 with one header whose frame_number is not its x, y: dropped, listed, and the
        # scan, short of that sector, ends when idle.
        bad = (100, 2)
        for frame, sector in sorted(EVERY_SECTOR):
            push.send_multipart(ncem_message(2, frame, sector, 7 if (frame, sector) == bad
                                             else None))
        assert job.wait(timeout_s=60 + IDLE_S) == 0, job.log.read_text()[-3000:]
    finally:
        push.close(linger=0)
        context.term()
        gateway.stop()
    whole, short = job.result_lines()
    assert (whole["scan"], whole["status"], whole["lost_sectors"]) == (1, "complete", 0)
    assert _counted(Path(str(whole["path"]))) == EVERY_SECTOR
    assert (short["scan"], short["status"], short["lost_sectors"]) == (2, "partial", 1)
    assert short["loss_manifest"] == [[*bad, "position_mismatch"]]
    assert _counted(Path(str(short["path"]))) == EVERY_SECTOR - {bad}


def test_an_ncem_scan_carried_across_a_gateway_restart_ends_when_idle_every_sector_accounted(
        site: StaticSite) -> None:
    """NCEM producers send no scan_end: a scan restored from the journal cannot tell which of its
    sectors arrived before the restart, so it ends after ``scan_idle_s`` of quiet, not at its last
    sector; and every sector is still counted or listed."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    first = GatewayProcess(site.config, _metrics(site))
    second = None
    try:
        job = site.job("job", "--scans", "1")
        push.curve_secretkey, push.curve_publickey = site.client.secret, site.client.public
        push.curve_serverkey = site.server
        push.connect(site.endpoint)
        order = sorted(EVERY_SECTOR)
        cut = len(order) * 3 // 10
        for frame, sector in order[:cut]:
            push.send_multipart(ncem_message(1, frame, sector))
        eventually(lambda: first.forwarded() >= cut, timeout_s=60, what="30% forwarded")
        _kill_and_see_the_break(first, push)
        second = GatewayProcess(site.config, _metrics(site))
        for frame, sector in order[cut:]:
            push.send_multipart(ncem_message(1, frame, sector))
        with ReceiptClient(site.receipts, site.server, site.client) as receipts:
            report = await_report(receipts, 1, timeout_s=60)
        assert job.wait(timeout_s=60) == 0, job.log.read_text()[-3000:]
        second.stop()
    finally:
        push.close(linger=0)
        context.term()
        if second is None:
            first.stop()
    assert (report.closed_by, report.resumed) == ("idle", True)
    [result] = job.result_lines()
    counted = _counted(Path(str(result["path"])))
    assert result["received_sectors"] == len(counted)
    assert result["received_sectors"] + result["lost_sectors"] == len(EVERY_SECTOR)
    assert set(order[cut:]) <= counted  # all sent after the restart
    print(f"NCEM scan across a gateway restart: {len(EVERY_SECTOR)} sectors = "
          f"{result['received_sectors']} counted + {result['lost_sectors']} listed lost; "
          f"closed when idle")


def _kill_and_see_the_break(gateway: GatewayProcess, push: zmq.Socket[bytes]) -> None:
    """Kill the gateway and wait until ``push`` has seen its connection break: what it sends
    after that waits in its queue for the next gateway, instead of going into the dead socket."""
    monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        gateway.kill()
        assert monitor.poll(10_000), "the producer never saw the gateway go"
    finally:
        push.disable_monitor()
        monitor.close(linger=0)


def contract_producer(context: zmq.Context[zmq.Socket[bytes]], client: KeyPair, server: bytes,
                      endpoint: str, linger_ms: int = 0) -> zmq.Socket[bytes]:
    """A producer that follows only the contract: a bare CURVE PUSH socket, connected."""
    push = context.socket(zmq.PUSH)
    push.curve_secretkey, push.curve_publickey = client.secret, client.public
    push.curve_serverkey = server
    push.linger = linger_ms
    push.connect(endpoint)
    return push


def send_sectors(push: zmq.Socket[bytes], scan: int, sectors: list[tuple[int, int]],
                 first_seq: int = 0) -> None:
    """Data messages of ``scan``, one per (frame, sector), numbered from ``first_seq``."""
    for seq, (frame, sector) in enumerate(sectors, first_seq):
        push.send_multipart([encode(Data(v=1, scan=scan, frame=frame, sector=sector, seq=seq)),
                             CAMERA.sector(frame, sector).tobytes()])


def _send_part(push: zmq.Socket[bytes], sectors: list[tuple[int, int]]) -> None:
    """One producer's part of scan 1, and its scan_end."""
    send_sectors(push, 1, sectors)
    push.send(encode(ScanEnd(v=1, scan=1, sent=len(sectors))))


def test_a_gateway_restarted_after_one_producer_ended_its_part_closes_the_scan_at_the_others_end(
        site: StaticSite) -> None:
    """Two contract-only producers; the first has streamed its half and ended the scan when the
    gateway is killed. It sends nothing more, so the restarted gateway must still count its
    scan_end (from the journal) to close the scan at the second producer's, not when idle."""
    context = zmq.Context()
    pushes: list[zmq.Socket[bytes]] = []
    first = GatewayProcess(site.config, _metrics(site))
    second = None
    try:
        job = site.job("job", "--scans", "1")
        pushes += [contract_producer(context, site.client, site.server, site.endpoint)
                   for _ in range(2)]
        rows, cols = CAMERA.spec.scan_shape
        for push in pushes:
            push.send(encode(ScanBegin(v=1, scan=1, scan_shape=(rows, cols),
                                       frame_shape=(576, 576), sectors=4, producers=2,
                                       dtype="uint16")))
        order = sorted(EVERY_SECTOR)
        halves = order[0::2], order[1::2]
        _send_part(pushes[0], halves[0])
        journal = site.spool_dir / JOURNAL

        def first_end_journaled() -> bool:
            return read_journal(journal, closed_kept=8).ends.get((SESSION, 1)) == [len(halves[0])]

        eventually(first_end_journaled, timeout_s=60, what="the first producer's scan_end taken")
        _kill_and_see_the_break(first, pushes[1])
        second = GatewayProcess(site.config, _metrics(site))
        _send_part(pushes[1], halves[1])
        with ReceiptClient(site.receipts, site.server, site.client) as receipts:
            report = await_report(receipts, 1, timeout_s=60)
        assert job.wait() == 0, job.log.read_text()[-3000:]
        second.stop()
    finally:
        for push in pushes:
            push.close()
        context.term()
        if second is None:
            first.stop()
    assert (report.closed_by, report.sent, report.resumed) == ("scan_end", len(order), True)
    [result] = job.result_lines()
    counted = _counted(Path(str(result["path"])))
    assert result["expected_sectors"] == len(EVERY_SECTOR)
    assert result["received_sectors"] == len(counted)
    assert result["received_sectors"] + result["lost_sectors"] == len(EVERY_SECTOR)
    assert set(halves[1]) <= counted  # all sent after the restart, with nothing in flight
    print(f"gateway restarted after one of two producers ended: {len(EVERY_SECTOR)} sectors = "
          f"{result['received_sectors']} counted + {result['lost_sectors']} listed lost; the "
          f"scan closed by the second producer's scan_end")


def test_a_gateway_restarted_mid_scan_carries_on_a_scan_whose_producer_never_announces_it_again(
        site: StaticSite) -> None:
    """The producer here follows only the contract: one scan_begin, data, one scan_end, and no
    scan_begin again after the gateway it streams to was killed and restarted."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.curve_secretkey, push.curve_publickey = site.client.secret, site.client.public
    push.curve_serverkey = site.server
    first = GatewayProcess(site.config, _metrics(site))
    second = None
    try:
        job = site.job("job", "--scans", "1")
        push.connect(site.endpoint)
        rows, cols = CAMERA.spec.scan_shape
        push.send(encode(ScanBegin(v=1, scan=1, scan_shape=(rows, cols), frame_shape=(576, 576),
                                   sectors=4, producers=1, dtype="uint16")))
        order = sorted(EVERY_SECTOR)
        cut = len(order) * 3 // 10

        def send(sectors: list[tuple[int, int]], seq: int) -> None:
            for offset, (frame, sector) in enumerate(sectors):
                push.send_multipart([encode(Data(v=1, scan=1, frame=frame, sector=sector,
                                                 seq=seq + offset)),
                                     CAMERA.sector(frame, sector).tobytes()])

        send(order[:cut], 0)
        eventually(lambda: first.forwarded() >= cut, timeout_s=60, what="30% forwarded")
        first.kill()
        second = GatewayProcess(site.config, _metrics(site))
        send(order[cut:], cut)
        push.send(encode(ScanEnd(v=1, scan=1, sent=len(order))))
        assert job.wait() == 0, job.log.read_text()[-3000:]
        counters = second.stop()
    finally:
        push.close(linger=0)
        context.term()
        if second is None:
            first.stop()
    [result] = job.result_lines()
    counted = _counted(Path(str(result["path"])))
    # What the first gateway held when it died is missing, and listed; the rest is counted.
    assert result["received_sectors"] == len(counted)
    assert result["received_sectors"] + result["lost_sectors"] == len(EVERY_SECTOR)
    assert result["expected_sectors"] == len(EVERY_SECTOR)  # the whole scan, as its producer sent
    assert result["status"] == ("complete" if counted == EVERY_SECTOR else "partial")
    drops = counters["drops"]  # type: ignore[index]
    assert not [key for key in drops if key.endswith("/unknown_scan")], drops
    print(f"gateway restarted mid-scan, contract-only producer: {len(EVERY_SECTOR)} sectors = "
          f"{result['received_sectors']} counted + {result['lost_sectors']} listed lost")
