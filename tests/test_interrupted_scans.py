"""The whole path with real processes: control plane on real HTTP, a ``dsn gateway run
--controlplane-state`` process, consumer jobs launched through the jobs API (``mpiexec -n 2``),
CURVE producers streaming a synthetic 4D camera.

- A scan streamed while no consumer is registered is spooled; replayed later into the session, the
  MPI job counts exactly the events it counts for the same scan streamed directly (and both equal
  the planted electrons).
- Killing a rank mid-scan (SIGKILL; Open MPI then ends the job) gives a scan the gateway reports
  ``partial``: every sector it forwarded before the job's leases ran out is listed lost, the rest is
  in the spool, each sector in exactly one of the two; nothing is ever reported ``complete``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stempy.io
import zmq
from cp_helpers import ControlPlane, metric, metrics_text
from test_cp_sessions_api import WORKER_SCOPE
from waiting import eventually_async

from common.keys import KeyPair, load_keypair
from dataplane.producer import Producer, replay_spool
from dataplane.spool import SpoolReader
from dataplane.synthetic import CameraSpec, SyntheticCamera

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.timeout(180)]

RANKS = 2
SECTORS = 4
CAMERA = SyntheticCamera(CameraSpec(scan_shape=(6, 6), seed=5))
EVERY_SECTOR = {(f, s) for f in range(CAMERA.spec.positions) for s in range(SECTORS)}
WAIT_S = 60  # process start-up and MPI jobs, with room for a loaded machine
POLL_S = 0.1  # each check is an HTTP request


class Session:
    """One session of project alpha and the producer's CURVE identity."""

    def __init__(self, cp: ControlPlane, token: str, opened: dict[str, Any],
                 client: KeyPair) -> None:
        self.cp, self.token, self.id, self.client = cp, token, str(opened["id"]), client
        self.base = f"/api/v1/sessions/{self.id}"
        self.server_key = load_keypair(cp.settings.gateway_public_key_file).public

    def producer(self) -> Producer:
        return Producer(self.cp.settings.gateway_endpoint, self.server_key, self.client,
                        send_timeout_s=60)

    async def launch(self, scans: int, **params: Any) -> tuple[str, Path]:
        response = await self.cp.call("POST", f"{self.base}/jobs", self.token, json={
            "template": "local-mpiexec", "ranks": RANKS, "params": {"scans": scans, **params}})
        assert response.status == 202, await response.text()
        job = await response.json()
        await eventually_async(self._live_consumers(RANKS), timeout_s=WAIT_S,
                               what="the job's ranks to register", interval_s=POLL_S)
        return response.headers["Location"], self.cp.settings.jobs_dir / job["id"] / "job.log"

    def _live_consumers(self, count: int) -> Callable[[], Any]:
        async def check() -> bool:
            detail = await (await self.cp.call("GET", self.base, self.token)).json()
            return bool(detail["counters"]["live_consumers"] == count)
        return check

    async def job_ended(self, job: str) -> dict[str, Any]:
        async def ended() -> dict[str, Any] | None:
            answer = await (await self.cp.call("GET", job, self.token)).json()
            return None if answer["state"] in ("pending", "running") else dict(answer)
        return await eventually_async(ended, timeout_s=WAIT_S, what="the job to end",
                                      interval_s=POLL_S)

    async def results(self, scan: int) -> list[dict[str, Any]]:
        response = await self.cp.call("GET", f"{self.base}/scans/{scan}", self.token)
        return [] if response.status == 404 else list((await response.json())["items"])


def stream(session: Session, scan: int, frames: range, *, begin: bool = True,
           end: bool = True, producer: Producer | None = None) -> Producer:
    """Send ``frames`` of CAMERA (every sector) as scan ``scan``."""
    producer = producer or session.producer()
    if begin:
        producer.begin_scan(scan, CAMERA.spec.scan_shape, producers=1)
    for frame in frames:
        for sector in range(SECTORS):
            producer.send(frame, sector, CAMERA.sector(frame, sector))
    if end:
        producer.end_scan()
        producer.close()
    return producer


def events_by_frame(path: Path) -> list[list[int]]:
    counted = stempy.io.load_electron_counts(str(path))
    return [sorted(np.asarray(e).tolist()) for e in counted.data[:, 0]]


def planted_by_frame() -> list[list[int]]:
    return [sorted(CAMERA.planted(f).tolist()) for f in range(CAMERA.spec.positions)]


def rank_pid(job_log: Path, rank: int) -> int:
    for line in job_log.read_text().splitlines():
        if '"event": "listening"' in line:
            entry = json.loads(line)
            if entry["rank"] == rank:
                return int(entry["pid"])
    raise AssertionError(f"rank {rank} is not listening yet:\n{job_log.read_text()[-2000:]}")


def rank_events(job_log: Path, event: str) -> list[dict[str, Any]]:
    """The ranks' JSON log lines for ``event`` (other lines are MPI's or the batch system's)."""
    entries = []
    for line in job_log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            entries.append(json.loads(line))
    return entries


async def open_session(cp: ControlPlane) -> Session:
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    keys = KeyPair(*zmq.curve_keypair())
    response = await cp.call("POST", "/api/v1/sessions", token, json={
        "project": "alpha", "template": "4dstem", "params": {},
        "client_key": keys.public.decode()})
    assert response.status == 201, await response.text()
    return Session(cp, token, dict(await response.json()), keys)


async def test_a_spooled_scan_replayed_counts_the_same_events_and_a_killed_rank_is_accounted(
        served: tuple[ControlPlane, str, Path]) -> None:
    cp, metrics, spool_dir = served
    session = await open_session(cp)
    await eventually_async(lambda: "dsn_gateway_consumers" in metrics_text(metrics),
                           timeout_s=WAIT_S, what="the gateway to serve", interval_s=POLL_S)

    # 1. No consumer yet: scan 1 is spooled.
    await asyncio.to_thread(stream, session, 1, range(CAMERA.spec.positions))
    spool = await eventually_async(lambda: list(spool_dir.glob(f"{session.id}_scan000001.spool")),
                                   timeout_s=WAIT_S, what="the spool file", interval_s=POLL_S)
    [spool_file] = spool

    # 2. A job joins; the spool is replayed as scan 2 (scan 1 is closed in this session) and the
    # same scan streamed directly as scan 3.
    job, _ = await session.launch(scans=2)
    await asyncio.to_thread(replay_spool, spool_file, cp.settings.gateway_endpoint,
                            session.server_key, session.client, scan=2, send_timeout_s=60)
    await asyncio.to_thread(stream, session, 3, range(CAMERA.spec.positions))
    assert (await session.job_ended(job))["state"] == "succeeded"
    [replayed], [direct] = await session.results(2), await session.results(3)
    for result in (replayed, direct):
        assert (result["source"], result["status"], result["frames"]) == (
            "consumer", "complete", CAMERA.spec.positions)
    assert replayed["events"] == direct["events"]
    assert events_by_frame(Path(replayed["path"])) == events_by_frame(Path(direct["path"])) \
        == planted_by_frame()

    # 3. Another job; rank 1 is killed mid-scan 4.
    job, job_log = await session.launch(scans=1)
    half = CAMERA.spec.positions // 2
    producer = await asyncio.to_thread(stream, session, 4, range(half), end=False)
    await eventually_async(lambda: metric(metrics, "dsn_gateway_messages_total", session.id)
                           >= 2 * CAMERA.spec.positions * SECTORS + half * SECTORS,
                           timeout_s=WAIT_S, what="the first half", interval_s=POLL_S)
    os.kill(rank_pid(job_log, 1), signal.SIGKILL)
    assert (await session.job_ended(job))["state"] == "failed"
    rest = threading.Thread(target=stream, args=(session, 4, range(half, CAMERA.spec.positions)),
                            kwargs={"begin": False, "producer": producer})
    rest.start()
    # The dead job's leases run out (the control plane's clock is the tests' to move).
    cp.clock.advance(cp.settings.lease_s + 1)
    [report] = await eventually_async(lambda: session.results(4), timeout_s=WAIT_S,
                                      what="the gateway's report", interval_s=POLL_S)
    await asyncio.to_thread(rest.join, 30)
    assert not rest.is_alive()

    assert (report["source"], report["status"]) == ("gateway", "partial")
    lost = {(f, s) for f, s, _ in report["loss_manifest"]}
    with SpoolReader(Path(report["path"])) as reader:
        spooled = [(msg.frame, msg.sector) for msg, _ in reader.records()]
        assert reader.info.manifest.sent == len(EVERY_SECTOR)
    assert len(set(spooled)) == len(spooled) == report["spooled_sectors"] > 0
    assert lost.isdisjoint(spooled) and lost | set(spooled) == EVERY_SECTOR
    assert len(lost) == report["lost_sectors"] >= half * SECTORS
    assert report["lost_by_reason"] == {"consumer_gone": len(lost)}
    print(f"rank killed mid-scan: {len(EVERY_SECTOR)} sectors = {len(lost)} listed lost "
          f"(consumer_gone) + {len(spooled)} spooled; 0 unaccounted")
    listed = await (await cp.call("GET", f"/api/v1/scans?session={session.id}",
                                  session.token)).json()
    assert sorted((r["scan"], r["source"], r["status"]) for r in listed["items"]) == [
        (1, "gateway", "spooled"), (2, "consumer", "complete"), (3, "consumer", "complete"),
        (4, "gateway", "partial")]
    # The spooled scan is listed with its file, so that its replay can be found.
    [spooled] = [r for r in listed["items"] if r["scan"] == 1]
    assert (spooled["path"], spooled["spooled_sectors"], spooled["lost_sectors"]) == (
        str(spool_file), len(EVERY_SECTOR), 0)
