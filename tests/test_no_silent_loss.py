"""No silent loss on the paths beside the control plane's, with real processes: a ``dsn gateway
run --config`` process, real ``mpiexec`` consumer jobs, CURVE producers, ``kill -9``.

Across every case, each sector of a scan ends up in exactly one place: counted in an output file,
in a spool file, or listed lost with a reason; and no damaged scan is reported ``complete``.
"""

from __future__ import annotations

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
from test_consumer_mpi import SESSION as CONSUMER_SESSION
from test_faults_gateway import GatewayProcess
from waiting import eventually

from common.keys import KeyPair, create_keypair, load_keypair
from common.ports import free_port
from dataplane.producer import Producer, replay_spool, stream_synthetic
from dataplane.spool import SpoolReader, spool_name
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(240)]

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SESSION = CONSUMER_SESSION  # the session GatewayProcess reads the metrics of
RANKS = 2
CAMERA = SyntheticCamera(CameraSpec(scan_shape=(24, 24), seed=7))
PLAN = StreamPlan(CAMERA.spec, producers=4, seed=7)
EVERY_SECTOR = {(f, s) for f in range(CAMERA.spec.positions) for s in range(CAMERA.spec.sectors)}


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
    public, secret = zmq.curve_keypair()
    create_keypair(tmp_path / "keys", "gateway")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "version": 1,
        "gateway": {"ingress": endpoint,
                    "server_secret_key_file": str(tmp_path / "keys" / "gateway.key_secret"),
                    "metrics": f"127.0.0.1:{free_port()}", "spool_dir": str(tmp_path / "spool")},
        "sessions": [{"id": SESSION, "client_keys": [public.decode()],
                      "allowed_networks": ["127.0.0.0/8"], "allowed_targets": ["127.0.0.0/8"],
                      "consumers": [f"tcp://127.0.0.1:{free_port()}" for _ in range(RANKS)],
                      # Small queues: the kill lands while most of the scan is still to come.
                      "limits": {"hwm": 16}}],
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
