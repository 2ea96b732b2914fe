"""A session over real HTTP with real MPI consumers: open, launch, register, stream, report, leave.

The control plane is the real app on a real loopback port (the job reaches it at the URL the job
template exports); ``POST .../jobs`` starts the shipped ``local-mpiexec`` template, whose two ranks
bind ephemeral ports and register them. The test then plays the gateway: it pushes one routed scan
to the registered endpoints in rank order, and reads the result the root rank posted back.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
import stempy.io
import zmq
from cp_helpers import ControlPlane, served_on
from test_cp_sessions_api import WORKER_SCOPE, open_session, start_control_plane
from waiting import eventually_async

from common.protocol import Data, RoutedScanBegin, RoutedScanEnd, encode
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


def push_scan(session: str, endpoints: list[str]) -> None:
    """The gateway's part: scan_begin to every member, frame f to member f mod N, then scan_end."""
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
                v=1, session=session, scan=SCAN, scan_shape=CAMERA.spec.scan_shape,
                frame_shape=(576, 576), sectors=4, dtype="uint16", members=RANKS, index=index)))
        sent = [0] * RANKS
        for seq, (frame, sector) in enumerate(
                (f, s) for f in range(CAMERA.spec.positions) for s in range(4)):
            header = encode(Data(v=1, scan=SCAN, frame=frame, sector=sector, seq=seq))
            pushers[frame % RANKS].send_multipart([header, CAMERA.sector(frame, sector).data])
            sent[frame % RANKS] += 1
        total = sum(sent)
        for index, push in enumerate(pushers):
            push.send(encode(RoutedScanEnd(v=1, scan=SCAN, expected=sent[index], sent=total,
                                           accepted=total, dropped={}, drops=[],
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


async def run_session(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    token = str((await cp.project_token("alpha", scope=WORKER_SCOPE))["token"])
    response = await open_session(cp, token)
    assert response.status == 201, await response.text()
    session = (await response.json())["id"]
    base = f"/api/v1/sessions/{session}"

    response = await cp.call("POST", f"{base}/jobs", token,
                             json={"template": "local-mpiexec", "ranks": RANKS,
                                   "params": {"scans": 1}})
    assert response.status == 202, await response.text()
    job_path = response.headers["Location"]
    job_log = cp.settings.jobs_dir / (await response.json())["id"] / "job.log"

    detail = await poll(cp, token, base, lambda s: s["counters"]["live_consumers"] == RANKS)
    live = sorted(detail["consumers"], key=lambda c: c["rank"])
    assert [c["rank"] for c in live] == list(range(RANKS))
    assert len({c["job_id"] for c in live}) == 1
    assert detail["config"]["sessions"][0]["consumers"] == [c["endpoint"] for c in live]

    await asyncio.to_thread(push_scan, session, [c["endpoint"] for c in live])

    job = await poll(cp, token, job_path, lambda j: j["state"] not in ("pending", "running"))
    assert job["state"] == "succeeded", job_log.read_text()[-3000:]

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
