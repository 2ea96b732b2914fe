"""A real consumer job (``local-mpiexec``, two MPI ranks) whose session's gateway is lost mid-scan.

Two real ``dsn gateway run`` processes register with one control plane on a real port; a session of
the shipped ``4dstem`` template is placed on ``east`` and a job's ranks register on it. A producer
of the SDK streams the first half of a scan of the synthetic camera through east, which is then
killed (SIGKILL); once east counts as silent on the control plane's clock the session moves to
``west``. The producer follows its session and streams the whole scan again, same scan number,
through west: the job ignores west's second routed ``scan_begin``, counts what it already had as
duplicates, ends the scan at west's routed ``scan_end`` and reports it ``complete`` with the
planted electrons, in its HDF5 file and at the control plane.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stempy.io
import zmq
from cp_helpers import SHIPPED_POLICY, ManualClock, metric, served_on
from cp_helpers import start_control_plane as start_cp
from test_cp_sessions_api import WORKER_SCOPE
from test_gateway_placement import TIMEOUT_S, GatewayProcess, Site
from waiting import eventually, eventually_async

from common.client import Client
from common.keys import KeyPair, create_keypair, load_keypair
from controlplane.admin.bootstrap import initialize
from dataplane.producer import Producer, ProducerSession
from dataplane.synthetic import CameraSpec, SyntheticCamera

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(240)]

RANKS = 2
SECTORS = 4
SCAN = 5
CAMERA = SyntheticCamera(CameraSpec(scan_shape=(6, 6), seed=11))
POSITIONS = CAMERA.spec.positions
HALF = POSITIONS // 2
WAIT_S = 60
POLL_S = 0.1
# Longer than the control plane's clock is moved to make a gateway silent, so the job's leases
# outlive that move; a third of it is how often the ranks heartbeat.
LEASE_S = 12


@pytest.fixture
async def site(tmp_path: Path, free_port: Callable[[], int]) -> AsyncIterator[Site]:
    """A control plane on a real port (jobs reach it there) admitting gateways ``east`` and
    ``west``, none started, with no configured gateway to fall back to."""
    state_dir, clock = tmp_path / "state", ManualClock()
    await initialize(state_dir, policy_path=SHIPPED_POLICY, now=clock())
    gateways = {}
    for name in ("east", "west"):
        public, _ = create_keypair(tmp_path / name, "server")
        shutil.copyfile(public, state_dir / "gateways" / f"{name}.key")
        gateways[name] = GatewayProcess(name, f"tcp://127.0.0.1:{free_port()}",
                                        load_keypair(tmp_path / name / "server.key_secret"),
                                        f"127.0.0.1:{free_port()}")
    port = free_port()
    async with served_on(port) as serve:
        cp = await start_cp(serve, state_dir, clock=clock, port=port, reconcile_s=0.2,
                            gateway_timeout_s=TIMEOUT_S, gateway_fallback=False,
                            lease_s=LEASE_S)
        await cp.create_project("alpha", quotas={"sessions": 8})
        running = Site(cp, gateways, tmp_path / "spool", free_port, serve)
        try:
            yield running
        finally:
            running.stop()


class Moving:
    """A session placed on east with a 2-rank job registered on it, and its producer."""

    def __init__(self, site: Site, token: str, producing: ProducerSession) -> None:
        self.site, self.token, self.producing = site, token, producing
        self.id = producing.session.id
        self.base = f"/api/v1/sessions/{self.id}"
        self.east, self.west = site.gateways["east"], site.gateways["west"]
        self.job_log = Path()

    async def launch(self, scans: int) -> str:
        response = await self.site.cp.call("POST", f"{self.base}/jobs", self.token, json={
            "template": "local-mpiexec", "ranks": RANKS, "params": {"scans": scans}})
        assert response.status == 202, await response.text()
        self.job_log = self.site.cp.settings.jobs_dir / (await response.json())["id"] / "job.log"
        await self.connected(self.east)
        return str(response.headers["Location"])

    def rank_events(self, event: str) -> list[dict[str, Any]]:
        """The ranks' JSON log lines for ``event``."""
        return [json.loads(line) for line in self.job_log.read_text(errors="replace").splitlines()
                if line.startswith("{") and f'"event": "{event}"' in line]

    async def connected(self, gateway: GatewayProcess) -> None:
        async def all_ranks() -> bool:
            return await asyncio.to_thread(metric, gateway.metrics,
                                           "dsn_gateway_consumers_connected", self.id) == RANKS

        await eventually_async(all_ranks, timeout_s=WAIT_S,
                               what=f"{gateway.name} connected to the job's ranks",
                               interval_s=POLL_S)

    def half_through_east(self) -> None:
        """Scan SCAN's first half through east, seen forwarded; then east is killed."""
        target = self.producing.gateway()
        with Producer(target.endpoint, target.server_public, target.client,
                      send_timeout_s=30) as producer:
            producer.begin_scan(SCAN, CAMERA.spec.scan_shape, producers=1)
            send(producer, range(HALF))
            eventually(lambda: metric(self.east.metrics, "dsn_gateway_messages_total", self.id)
                       >= HALF * SECTORS, timeout_s=WAIT_S, what="east forwarding the first half",
                       interval_s=POLL_S)
            assert self.east.process is not None
            self.east.process.send_signal(signal.SIGKILL)
            self.east.process.wait(timeout=10)
            producer.close(linger_s=0)

    async def move(self) -> None:
        """East silent on the control plane's clock; the session moves to west, which connects
        to the ranks."""
        self.site.cp.clock.advance(TIMEOUT_S + 1)

        async def moved() -> bool:
            assert await asyncio.to_thread(self.producing.follow_gateway)
            return True

        await eventually_async(moved, timeout_s=WAIT_S, what="the session moved to west",
                               interval_s=POLL_S)
        assert self.producing.session.gateway_name == "west"
        await self.connected(self.west)

    def stream(self, scan: int) -> None:
        """The whole of ``scan`` through the session's gateway."""
        with self.producing.producer(send_timeout_s=30) as producer:
            producer.begin_scan(scan, CAMERA.spec.scan_shape, producers=1)
            send(producer, range(POSITIONS))
            producer.end_scan()

    async def job_ended(self, job: str) -> dict[str, Any]:
        async def ended() -> dict[str, Any] | None:
            answer = await (await self.site.cp.call("GET", job, self.token)).json()
            return None if answer["state"] in ("pending", "running") else dict(answer)
        return await eventually_async(ended, timeout_s=WAIT_S, what="the job to end",
                                      interval_s=POLL_S)

    async def result(self, scan: int) -> dict[str, Any]:
        answer = await self.site.cp.call("GET", f"{self.base}/scans/{scan}", self.token)
        assert answer.status == 200, await answer.text()
        [result] = (await answer.json())["items"]
        return dict(result)


def send(producer: Producer, frames: range) -> None:
    for frame in frames:
        for sector in range(SECTORS):
            producer.send(frame, sector, CAMERA.sector(frame, sector))


def events_by_frame(path: Path) -> list[list[int]]:
    counted = stempy.io.load_electron_counts(str(path))
    return [sorted(np.asarray(e).tolist()) for e in counted.data[:, 0]]


PLANTED = [sorted(CAMERA.planted(f).tolist()) for f in range(POSITIONS)]


async def placed_on_east(site: Site) -> Moving:
    site.start("east", capacity=4)
    site.start("west", capacity=4)
    await site.registered("east", "west")
    token = str((await site.cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    keys = KeyPair(*zmq.curve_keypair())
    producing = ProducerSession(Client(site.cp.url, token), template="4dstem", client=keys)
    session = await asyncio.to_thread(producing.open)
    assert session.gateway_name == "east"  # a tie, by name
    return Moving(site, token, producing)


async def test_a_job_counts_a_scan_streamed_again_through_the_gateway_its_session_moved_to(
        site: Site) -> None:
    moving = await placed_on_east(site)
    job = await moving.launch(scans=1)
    await asyncio.to_thread(moving.half_through_east)
    await moving.move()
    await asyncio.to_thread(moving.stream, SCAN)
    ended = await moving.job_ended(job)
    assert ended["state"] == "succeeded", ended

    result = await moving.result(SCAN)
    assert (result["source"], result["status"], result["frames"]) == (
        "consumer", "complete", POSITIONS)
    assert (result["lost_sectors"], result["incomplete_frames"]) == (0, 0)
    assert result["loss_manifest"] == []
    # Every sector once, counted; what came through east too, again through west, a duplicate.
    assert result["expected_sectors"] == result["received_sectors"] == POSITIONS * SECTORS
    assert 0 < result["duplicate_sectors"] <= HALF * SECTORS
    assert result["conflicting_duplicates"] == 0
    assert result["events"] == sum(len(p) for p in PLANTED)
    assert events_by_frame(Path(result["path"])) == PLANTED
    # West's scan_begin reached both ranks holding the scan begun through east: ignored.
    repeated = [(e["rank"], e["scan"]) for e in moving.rank_events("message dropped")
                if e["reason"] == "scan_begin_repeated"]
    assert sorted(repeated) == [(rank, SCAN) for rank in range(RANKS)]
    print(f"scan {SCAN}: {POSITIONS * SECTORS} sectors counted, {result['duplicate_sectors']} of "
          "them a second time through west (duplicates)")
