"""A session over real HTTP with real MPI consumers: open, launch, register, stream, report, leave.

The control plane is the real app on a real loopback port (the job reaches it at the URL the job
template exports); ``POST .../jobs`` starts the shipped ``local-mpiexec`` template, whose two ranks
bind ephemeral ports and register them. The test then plays the gateway: it pushes one routed scan
to the registered endpoints in rank order, and reads the result the root rank posted back: its
file, and for scans with lost sectors the loss manifest the REST detail lists.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

import h5py
import pytest
import stempy.io
import zmq
from cp_helpers import ControlPlane, served_on
from test_cp_sessions_api import WORKER_SCOPE, open_session, start_control_plane
from waiting import eventually_async

from common.protocol import MAX_MANIFEST, Data, RoutedScanBegin, RoutedScanEnd, encode
from dataplane.synthetic import CameraSpec, SyntheticCamera

RANKS = 2
SCAN = 3
CAMERA = SyntheticCamera(CameraSpec(scan_shape=(4, 4), seed=21))


async def poll(cp: ControlPlane, token: str, path: str, done: Any, timeout_s: float = 60) -> Any:
    """GET ``path`` until ``done(answer)``; fails with the last answer after ``timeout_s``."""
    async def answered() -> Any:
        answer = await (await cp.call("GET", path, token)).json()
        assert done(answer), answer
        return answer

    return await eventually_async(answered, timeout_s=timeout_s, what=f"GET {path} to be done",
                                  interval_s=0.1)


def push_scan(session: str, endpoints: list[str], scan: int = SCAN,
              camera: SyntheticCamera = CAMERA, lost: Set[tuple[int, int]] = frozenset(),
              drops: Mapping[tuple[int, int], str] | None = None) -> None:
    """The gateway's part: scan_begin to every member, frame f to member f mod N, then scan_end.
    The ``lost`` sectors are not sent; those in ``drops`` are listed with the gateway's reason."""
    drops = drops or {}
    context = zmq.Context()
    pushers = []
    try:
        for endpoint in endpoints:
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 5000)  # deliver everything before the socket closes
            push.connect(endpoint)
            pushers.append(push)
        for index, push in enumerate(pushers):
            push.send(encode(RoutedScanBegin(
                v=1, session=session, scan=scan, scan_shape=camera.spec.scan_shape,
                frame_shape=(576, 576), sectors=4, dtype="uint16", members=RANKS, index=index)))
        sent = [0] * RANKS
        sectors = ((f, s) for f in range(camera.spec.positions) for s in range(4))
        for seq, (frame, sector) in enumerate(p for p in sectors if p not in lost):
            header = encode(Data(v=1, scan=scan, frame=frame, sector=sector, seq=seq))
            pushers[frame % RANKS].send_multipart([header, camera.sector(frame, sector).data])
            sent[frame % RANKS] += 1
        total = sum(sent)
        for index, push in enumerate(pushers):
            listed = [(f, s, r) for (f, s), r in sorted(drops.items()) if f % RANKS == index]
            push.send(encode(RoutedScanEnd(
                v=1, scan=scan, expected=sent[index], sent=total + len(drops), accepted=total,
                dropped={"invalid_header": len(drops)} if drops else {}, drops=listed,
                drops_truncated=False)))
    finally:
        for push in pushers:
            push.close()
        context.term()


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(120)
async def test_a_launched_job_registers_counts_a_scan_reports_it_and_leaves(
        tmp_path: Path, free_port: Any) -> None:
    port = free_port()
    async with served_on(port) as serve:
        cp = await start_control_plane(serve, tmp_path, port=port)
        await run_session(cp)


async def launch(cp: ControlPlane, scans: int) -> tuple[str, str, str, Path, list[str]]:
    """Open a session and launch a job for ``scans`` scans; once its ranks are live: the project
    token, the session id, the job's path and log, and the ranks' endpoints in rank order."""
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    response = await open_session(cp, token)
    assert response.status == 201, await response.text()
    session = (await response.json())["id"]
    base = f"/api/v1/sessions/{session}"

    response = await cp.call("POST", f"{base}/jobs", token,
                             json={"template": "local-mpiexec", "ranks": RANKS,
                                   "params": {"scans": scans}})
    assert response.status == 202, await response.text()
    job_path = response.headers["Location"]
    job_log = cp.settings.jobs_dir / (await response.json())["id"] / "job.log"

    detail = await poll(cp, token, base, lambda s: s["counters"]["live_consumers"] == RANKS)
    live = sorted(detail["consumers"], key=lambda c: c["rank"])
    assert [c["rank"] for c in live] == list(range(RANKS))
    assert len({c["job_id"] for c in live}) == 1
    assert detail["config"]["sessions"][0]["consumers"] == [c["endpoint"] for c in live]
    return token, session, job_path, job_log, [c["endpoint"] for c in live]


async def finished(cp: ControlPlane, token: str, job_path: str, job_log: Path) -> Any:
    job = await poll(cp, token, job_path, lambda j: j["state"] not in ("pending", "running"))
    assert job["state"] == "succeeded", job_log.read_text()[-3000:]
    return job


async def run_session(cp: ControlPlane) -> None:
    token, session, job_path, job_log, endpoints = await launch(cp, scans=1)
    base = f"/api/v1/sessions/{session}"
    await asyncio.to_thread(push_scan, session, endpoints)
    job = await finished(cp, token, job_path, job_log)

    listed = await (await cp.call("GET", "/api/v1/scans?project=alpha", token)).json()
    [result] = listed["items"]
    path = Path(result["path"])
    assert path == cp.settings.jobs_dir / job["id"] / "output" / f"{session}_scan{SCAN:06d}.h5"
    assert result["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (result["session"], result["scan"], result["frames"], result["status"]) == (
        session, SCAN, CAMERA.spec.positions, "complete")
    assert result["events"] == sum(len(CAMERA.planted(f)) for f in range(CAMERA.spec.positions))
    counted = stempy.io.load_electron_counts(str(path))
    assert tuple(counted.scan_shape) == CAMERA.spec.scan_shape

    after = await (await cp.call("GET", base, token)).json()
    assert [c["state"] for c in after["consumers"]] == ["left"] * RANKS
    assert after["counters"]["live_consumers"] == 0


# Lost on the way: some listed by the gateway with its reason, the rest never received.
LOST = {(1, 0), (2, 3), (5, 1), (5, 2), (9, 0), (9, 1), (9, 2), (9, 3), (14, 2), (15, 3)}
DROPS = {(5, 2): "invalid_header", (14, 2): "invalid_header"}
# A scan of which nothing arrives loses more sectors than a result may list.
EMPTY = SyntheticCamera(CameraSpec(scan_shape=(128, 129), seed=22))


async def scan_detail(cp: ControlPlane, token: str, session: str, scan: int) -> Any:
    answer = await cp.call("GET", f"/api/v1/sessions/{session}/scans/{scan}", token)
    assert answer.status == 200, await answer.text()
    [result] = (await answer.json())["items"]
    return result


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(180)
async def test_the_rest_detail_lists_every_lost_sector_a_job_reported(
        tmp_path: Path, free_port: Any) -> None:
    port = free_port()
    async with served_on(port) as serve:
        cp = await start_control_plane(serve, tmp_path, port=port)
        token, session, job_path, job_log, endpoints = await launch(cp, scans=2)
        await asyncio.to_thread(push_scan, session, endpoints, lost=LOST, drops=DROPS)
        await asyncio.to_thread(push_scan, session, endpoints, scan=SCAN + 1, camera=EMPTY,
                                lost={(f, s) for f in range(EMPTY.spec.positions)
                                      for s in range(4)})
        await finished(cp, token, job_path, job_log)

        lossy = await scan_detail(cp, token, session, SCAN)
        assert (lossy["source"], lossy["status"], lossy["lost_sectors"]) == (
            "consumer", "partial", len(LOST))
        assert lossy["loss_manifest"] == [[f, s, DROPS.get((f, s), "not_received")]
                                          for f, s in sorted(LOST)]
        assert not lossy["manifest_truncated"]

        empty = await scan_detail(cp, token, session, SCAN + 1)
        assert (empty["status"], empty["lost_sectors"]) == ("partial", EMPTY.spec.positions * 4)
        # The first MAX_MANIFEST in (frame, sector) order; the file holds them all.
        assert empty["manifest_truncated"]
        assert empty["loss_manifest"] == [[f, s, "not_received"]
                                          for f in range(MAX_MANIFEST // 4) for s in range(4)]
        with h5py.File(empty["path"], "r") as written:
            listed = written["metadata/stream/loss_manifest/frame_sector"].shape
        assert listed == (EMPTY.spec.positions * 4, 2)
