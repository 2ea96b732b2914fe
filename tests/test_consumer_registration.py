"""The consumer's control-plane side against the real control plane app on a real loopback port:
the token file, registration, heartbeats (and registering again after a lapse), leaving, result
reports with retries, and a 2-rank MPI job that cannot register stopping on every rank."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from cp_helpers import ClientFactory, ControlPlane
from test_cp_sessions_api import (
    RESULT,
    SHA,
    consumer_token,
    opened,
    start_control_plane,
)
from waiting import eventually_async

from common.logs import JsonLines
from common.restclient import RestError, with_retries
from common.results import ScanResult
from controlplane.launchers import mpi_environment, mpiexec_command
from dataplane.consumer.controlplane import ControlPlaneClient, Lease, Registration
from dataplane.consumer.errors import SetupError
from dataplane.consumer.registration import LeaseKeeper, bind_ephemeral
from dataplane.consumer.report import HttpResultReporter, report_body

SCAN_RESULT = ScanResult(
    session="", scan=7, path="/data/out/scan-7.h5", sha256=SHA, frames=16, events=120,
    expected_sectors=64, received_sectors=64, duplicate_sectors=0, conflicting_duplicates=0,
    lost_sectors=0, incomplete_frames=0, status="complete", loss_manifest=(),
    manifest_truncated=False)


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    control_plane = await start_control_plane(aiohttp_client, tmp_path, lease_s=3)
    await control_plane.create_project("alpha")
    return control_plane


def base_url(cp: ControlPlane) -> str:
    return str(cp.client.make_url("")).rstrip("/")


async def worker(cp: ControlPlane) -> tuple[str, str, ControlPlaneClient]:
    """(project token, session id, a client holding a consumer token of that project)."""
    token, session = await opened(cp)
    return token, session["id"], ControlPlaneClient(base_url(cp), await consumer_token(cp, token))


def me(rank: int = 0, port: int = 6001) -> Registration:
    return Registration(endpoint=f"tcp://127.0.0.1:{port}", rank=rank, job_id="job-1",
                        host="node-1")


async def consumers(cp: ControlPlane, token: str, session: str) -> list[dict[str, Any]]:
    detail = await (await cp.call("GET", f"/api/v1/sessions/{session}", token)).json()
    return list(detail["consumers"])


def capture_log() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines({}))
    log = logging.getLogger(f"test.consumer.{id(stream)}")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return log, stream


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- the token file ------------------------------------------------------------------------------

# --- registration, heartbeat, leave --------------------------------------------------------------

async def test_register_heartbeat_and_leave(cp: ControlPlane) -> None:
    token, session, client = await worker(cp)
    lease = await asyncio.to_thread(client.register, session, me())
    assert lease.seconds == 3
    [registered] = await consumers(cp, token, session)
    assert (registered["id"], registered["endpoint"], registered["rank"], registered["state"]) == (
        lease.consumer_id, "tcp://127.0.0.1:6001", 0, "live")

    cp.clock.advance(2)
    renewed = await asyncio.to_thread(client.heartbeat, session, lease.consumer_id)
    assert renewed.consumer_id == lease.consumer_id
    assert (renewed.expires_at - lease.expires_at).total_seconds() == pytest.approx(2)

    await asyncio.to_thread(client.leave, session, lease.consumer_id)
    await asyncio.to_thread(client.leave, session, lease.consumer_id)  # idempotent
    assert [c["state"] for c in await consumers(cp, token, session)] == ["left"]
    with pytest.raises(RestError, match="has left; register again") as refused:
        await asyncio.to_thread(client.heartbeat, session, lease.consumer_id)
    assert refused.value.status == 409


async def test_refusals_carry_the_status_and_the_control_planes_reason(cp: ControlPlane) -> None:
    _, session, client = await worker(cp)
    outside = replace(me(), endpoint="tcp://10.0.0.1:6001")
    with pytest.raises(RestError, match="400 endpoint refused: 10.0.0.1 is outside") as bad:
        await asyncio.to_thread(client.register, session, outside)
    assert (bad.value.status, bad.value.retryable) == (400, False)

    forged = ControlPlaneClient(client.base_url, "not-a-token")
    with pytest.raises(RestError, match=r"^POST /api/v1/sessions/\S+/consumers: 401 ") as no:
        await asyncio.to_thread(forged.register, session, me())
    assert (no.value.status, "\n" in str(no.value), "not-a-token" in str(no.value)) == (
        401, False, False)


def test_an_absent_control_plane_is_a_retryable_error(free_port: Callable[[], int]) -> None:
    client = ControlPlaneClient(f"http://127.0.0.1:{free_port()}", "t", timeout_s=2)
    with pytest.raises(RestError,
                       match="cannot reach the control plane at http://127.0.0.1:") as absent:
        client.leave("s", "c")
    assert (absent.value.status, absent.value.retryable) == (None, True)


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(SetupError, match="is not http"):
        ControlPlaneClient("ftp://example.org", "t")


@pytest.mark.parametrize(("statuses", "calls", "sleeps", "succeeds"), [
    ([None, 503, 429], 4, [0.5, 1.0, 2.0], True),  # retried until it works
    ([503, 400], 2, [0.5], False),  # a refusal ends the retries at once
    ([503, 503, 503, 503], 4, [0.5, 1.0, 2.0], False),  # the last failure is raised
])
def test_retries_back_off_on_retryable_failures_only(statuses: list[int | None], calls: int,
                                                     sleeps: list[float], succeeds: bool) -> None:
    made: list[int] = []
    slept: list[float] = []

    def call() -> str:
        made.append(1)
        if len(made) <= len(statuses):
            raise RestError("failed", statuses[len(made) - 1])
        return "ok"

    if succeeds:
        assert with_retries(call, sleep=slept.append) == "ok"
    else:
        with pytest.raises(RestError):
            with_retries(call, sleep=slept.append)
    assert (len(made), slept) == (calls, sleeps)


@pytest.mark.timeout(30)
async def test_the_keeper_renews_the_lease_and_registers_again_after_a_lapse(
        cp: ControlPlane) -> None:
    token, session, client = await worker(cp)
    registration = me()
    lease = await asyncio.to_thread(client.register, session, registration)
    log, stream = capture_log()
    keeper = LeaseKeeper(client, session, registration, lease, log)
    keeper.start()
    try:
        # A 3 s lease is renewed every second: wait for a renewal at a moved clock.
        cp.clock.advance(1)
        await eventually_async(lambda: keeper.lease.expires_at > lease.expires_at, timeout_s=10,
                               what="a renewed lease")
        assert keeper.lease.consumer_id == lease.consumer_id
        # The lease lapses (here: the consumer left behind the keeper's back); the next heartbeat
        # is refused with 409 and the keeper takes a new lease for the same endpoint.
        await asyncio.to_thread(client.leave, session, lease.consumer_id)
        await eventually_async(lambda: keeper.lease.consumer_id != lease.consumer_id,
                               timeout_s=10, what="a new lease after the lapse")
    finally:
        await asyncio.to_thread(keeper.stop)
    states = {c["id"]: c["state"] for c in await consumers(cp, token, session)}
    assert states == {lease.consumer_id: "left", keeper.lease.consumer_id: "live"}
    assert "lease lapsed; registered again" in [r["event"] for r in records(stream)]


def test_lease_length_comes_from_the_control_planes_own_times() -> None:
    lease = Lease.from_answer({"id": "c1", "registered_at": "2026-01-01T00:00:00+00:00",
                               "lease_expires_at": "2026-01-01T00:00:30+00:00"})
    assert (lease.consumer_id, lease.seconds) == ("c1", 30)
    assert lease.registered_at == datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    with pytest.raises(RestError, match="malformed"):
        Lease.from_answer({"id": "c1"})


def test_ranks_bind_an_ephemeral_port_and_name_it(zmq_context: zmq.Context) -> None:
    socket, endpoint = bind_ephemeral(zmq_context, "127.0.0.1", hwm=8)
    try:
        assert endpoint.startswith("tcp://127.0.0.1:") and int(endpoint.rsplit(":", 1)[1]) > 0
    finally:
        socket.close(linger=0)
    for host, message in (("0.0.0.0", "not every interface"), ("node-1", "not an IP address"),
                          ("route:no-such-host.invalid", "no route to 'no-such-host.invalid'")):
        with pytest.raises(SetupError, match=message):
            bind_ephemeral(zmq_context, host, hwm=8)


def test_ranks_bind_the_address_their_node_reaches_a_named_peer_by(
        zmq_context: zmq.Context) -> None:
    # 127.0.0.2 is reached from 127.0.0.1, the loopback interface's own address: the source the
    # kernel picks, not the peer's address, is what the gateway can connect back to.
    socket, endpoint = bind_ephemeral(zmq_context, "route:127.0.0.2", hwm=8)
    try:
        assert endpoint.startswith("tcp://127.0.0.1:")
    finally:
        socket.close(linger=0)


# --- result reports ------------------------------------------------------------------------------

async def test_results_are_posted_and_listed(cp: ControlPlane) -> None:
    token, session, client = await worker(cp)
    log, stream = capture_log()
    reporter = HttpResultReporter(client, session, log)
    await asyncio.to_thread(reporter.report, replace(SCAN_RESULT, session=session))
    listed = await (await cp.call("GET", "/api/v1/scans?project=alpha", token)).json()
    assert [(r["session"], r["scan"], r["sha256"], r["status"]) for r in listed["items"]] == [
        (session, 7, RESULT["sha256"], "complete")]
    assert [r["event"] for r in records(stream)] == ["scan result recorded"]
    # As sent, in JSON: the session and scan travel in the URL.
    assert json.loads(json.dumps(report_body(SCAN_RESULT))) == RESULT


async def test_a_refused_result_is_logged_and_not_retried(cp: ControlPlane) -> None:
    _, session, client = await worker(cp)
    log, stream = capture_log()
    slept: list[float] = []
    reporter = HttpResultReporter(client, session, log, sleep=slept.append)
    claims_complete = replace(SCAN_RESULT, lost_sectors=3)  # "complete" with losses: 400
    await asyncio.to_thread(reporter.report, claims_complete)
    [entry] = records(stream)
    assert (entry["level"], entry["event"], entry["status"], entry["path"]) == (
        "error", "scan result not recorded by the control plane", 400, RESULT["path"])
    assert slept == []


def test_an_unreachable_control_plane_is_retried_then_logged(
        free_port: Callable[[], int]) -> None:
    client = ControlPlaneClient(f"http://127.0.0.1:{free_port()}", "t", timeout_s=2)
    log, stream = capture_log()
    slept: list[float] = []
    HttpResultReporter(client, "s", log, attempts=3, sleep=slept.append).report(SCAN_RESULT)
    [entry] = records(stream)
    assert (entry["level"], entry["status"]) == ("error", None)
    assert slept == [0.5, 1.0]


# --- a job that cannot register ------------------------------------------------------------------

async def run_consumer_job(cp: ControlPlane, tmp_path: Path, session: str, token_file: Path,
                           ) -> tuple[int, list[dict[str, Any]]]:
    detail = await (await cp.admin("GET", f"/api/v1/sessions/{session}")).json()
    config = tmp_path / "dsn.yaml"
    config.write_text(yaml.safe_dump(detail["config"]))
    argv = mpiexec_command(2, [sys.executable, "-m", "dataplane.consumer", "run", "--config",
                               str(config), "--session", session, "--output-dir",
                               str(tmp_path / "out")])
    env = mpi_environment({**os.environ, "DSN_CONTROLPLANE_URL": base_url(cp),
                           "DSN_CONSUMER_TOKEN_FILE": str(token_file)})
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    logs = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    return await process.wait(), logs


@pytest.mark.mpi
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("token", "mode", "message"), [
    ("not-a-token", 0o600, ": 401 "),
    (None, 0o640, "is readable by others"),
])
async def test_a_job_that_cannot_register_stops_on_every_rank(
        cp: ControlPlane, tmp_path: Path, token: str | None, mode: int, message: str) -> None:
    project_token, session, client = await worker(cp)
    token_file = tmp_path / "token"
    token_file.write_text(token or client.token)
    token_file.chmod(mode)
    code, logs = await run_consumer_job(cp, tmp_path, session, token_file)
    assert code != 0
    errors = [e for e in logs if e["level"] == "error"]
    assert sorted(e["rank"] for e in errors) == [0, 1], logs
    assert all(message in e["event"] and e["error"] == "JoinError" for e in errors), errors
    assert all(client.token not in json.dumps(e) for e in logs)
    assert await consumers(cp, project_token, session) == []
