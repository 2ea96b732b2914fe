"""A real consumer job (``local-mpiexec``, two MPI ranks) whose session's gateway is lost mid-scan.

Two real ``dsn gateway run`` processes register with one control plane on a real port; a session of
the shipped ``4dstem`` template is placed on ``east`` and a job's ranks register on it. A producer
of the SDK streams the first half of a scan of the synthetic camera through east, which is then
killed (SIGKILL); once east counts as silent on the control plane's clock the session moves to
``west``. The producer follows its session and streams the whole scan again, same scan number,
through west: the job ignores west's second routed ``scan_begin``, counts what it already had as
duplicates, ends the scan at west's routed ``scan_end`` and reports it ``complete`` with the
planted electrons, in its HDF5 file and at the control plane.

If the producer gives the scan up instead, the job learns from its heartbeats that the session
moved and, after ``--gateway-lost-s`` without a message of that scan, closes it ``partial``: every
sector that never came is listed ``gateway_lost``, and a scan streamed through west meanwhile
completes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import stempy.io
import zmq
from cp_helpers import ManualClock, metric, served_on
from cp_helpers import start_control_plane as start_cp
from test_cp_sessions_api import WORKER_SCOPE
from test_gateway_placement import TIMEOUT_S, GatewayProcess, Site, admitting_east_and_west
from waiting import eventually, eventually_async

from common.client import Client
from common.keys import KeyPair
from dataplane.consumer.order import GatewayWatch
from dataplane.producer import Producer, ProducerSession
from dataplane.synthetic import CameraSpec, SyntheticCamera

pytestmark = pytest.mark.timeout(240)

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
# The job's --gateway-lost-s: short, the producer here gives its scan up at once.
GATEWAY_LOST_S = 3


@pytest.fixture
async def site(tmp_path: Path, free_port: Callable[[], int]) -> AsyncIterator[Site]:
    """A control plane on a real port (jobs reach it there) admitting gateways ``east`` and
    ``west``, none started, with no configured gateway to fall back to."""
    state_dir, clock = tmp_path / "state", ManualClock()
    gateways = await admitting_east_and_west(state_dir, clock, free_port)
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

    async def launch(self, scans: int, samples: int = 40) -> str:
        response = await self.site.cp.call("POST", f"{self.base}/jobs", self.token, json={
            "template": "local-mpiexec", "ranks": RANKS,
            "params": {"scans": scans, "samples": samples}})
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


@pytest.mark.slow
@pytest.mark.mpi
# 40 samples: the thresholds wait for the scan's end (18 frames a rank); 2: they are agreed on
# the first frames through east, and the rest is counted as it arrives.
@pytest.mark.parametrize("samples", [40, 2])
async def test_a_job_counts_a_scan_streamed_again_through_the_gateway_its_session_moved_to(
        site: Site, samples: int) -> None:
    moving = await placed_on_east(site)
    job = await moving.launch(scans=1, samples=samples)
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


@pytest.mark.slow
@pytest.mark.mpi
async def test_a_scan_its_lost_gateway_left_open_is_reported_with_every_missing_sector(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSN_CONSUMER_GATEWAY_LOST_S", str(GATEWAY_LOST_S))  # the job inherits it
    moving = await placed_on_east(site)
    job = await moving.launch(scans=2)
    await asyncio.to_thread(moving.half_through_east)
    await moving.move()
    # The producer gives the scan up and streams the next one through west at once, while the
    # job still holds the first: the next one's thresholds wait behind it.
    await asyncio.to_thread(moving.stream, SCAN + 1)
    ended = await moving.job_ended(job)
    assert ended["state"] == "succeeded", moving.job_log.read_text()[-3000:]

    orphan = await moving.result(SCAN)
    assert (orphan["source"], orphan["status"], orphan["frames"]) == (
        "consumer", "partial", POSITIONS)
    received = orphan["received_sectors"]
    assert 0 < received <= HALF * SECTORS
    assert orphan["expected_sectors"] == received  # as far as it arrived: no scan_end said more
    assert orphan["lost_sectors"] == POSITIONS * SECTORS - received
    listed = {(f, s) for f, s, _ in orphan["loss_manifest"]}
    assert {reason for _, _, reason in orphan["loss_manifest"]} == {"gateway_lost"}
    assert len(listed) == orphan["lost_sectors"] and not orphan["manifest_truncated"]
    # Nothing of the second half was sent: all of it listed; of the first, what east lost.
    assert listed >= {(f, s) for f in range(HALF, POSITIONS) for s in range(SECTORS)}
    with h5py.File(orphan["path"], "r") as written:
        stream = written["metadata/stream"]
        in_file = {tuple(row) for row in stream["loss_manifest/frame_sector"][()].tolist()}
        reasons = {r.decode() if isinstance(r, bytes) else r
                   for r in stream["loss_manifest/reason"][()]}
        assert (stream.attrs["status"], stream.attrs["gateway_sent"]) == ("partial", 0)
    assert in_file == listed and reasons == {"gateway_lost"}
    # Every frame that arrived whole is counted as planted; the others hold what arrived.
    whole = [f for f in range(HALF) if not any((f, s) in listed for s in range(SECTORS))]
    assert whole
    counted = events_by_frame(Path(orphan["path"]))
    assert [counted[f] for f in whole] == [PLANTED[f] for f in whole]

    later = await moving.result(SCAN + 1)
    assert (later["status"], later["lost_sectors"], later["duplicate_sectors"]) == (
        "complete", 0, 0)
    assert events_by_frame(Path(later["path"])) == PLANTED
    moved = moving.rank_events("session moved to another gateway")
    assert [(e["rank"], e["scans"]) for e in moved] == [(0, [SCAN])]
    closed = moving.rank_events("scan closed: its gateway was lost")
    assert sorted((e["rank"], e["scan"]) for e in closed) == [(r, SCAN) for r in range(RANKS)]
    print(f"scan {SCAN}, its gateway lost: {received} sectors counted + "
          f"{orphan['lost_sectors']} listed gateway_lost = {POSITIONS * SECTORS}; scan "
          f"{SCAN + 1} through west complete")


def test_the_scans_held_at_a_move_that_then_hear_nothing_for_the_grace_are_lost() -> None:
    moved: list[datetime | None] = [datetime(2026, 1, 1, tzinfo=UTC)]  # before the job joined
    clock = ManualClock(0.0)
    watch = GatewayWatch(lambda: moved[0], grace_s=10, log=logging.getLogger("test"),
                         clock=clock)
    assert watch.lost([1, 2]) == []  # that move concerns no scan this job holds
    clock.advance(100)
    assert watch.lost([1, 2]) == []
    moved[0] = datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    assert watch.lost([1, 2, 3]) == []  # scans 1-3 suspect from now
    clock.advance(9)
    watch.heard(2)  # the new gateway began it again: served
    assert watch.lost([1, 2, 3, 4]) == []  # 4 began after the move was heard of: not suspect
    clock.advance(1)
    assert watch.lost([1, 2, 3, 4]) == [1, 3]
    clock.advance(100)
    assert watch.lost([2, 4]) == []  # each lost once; the others never
    # Another move: the scans held then are suspect anew, from then.
    moved[0] = datetime(2026, 1, 1, 0, 9, tzinfo=UTC)
    assert watch.lost([2, 4]) == []
    clock.advance(10)
    assert watch.lost([2, 4]) == [2, 4]
