"""``common.client.Client`` against the real control plane app on a loopback port: sessions ended
on leaving a ``with`` block, jobs launched, cancelled and waited for, scan results read and waited
for, and every failure of the error tree with the status that names it, never the token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from aiohttp import web
from cp_helpers import ClientFactory, ControlPlane, write_policy
from test_cp_sessions_api import (
    RESULT,
    SLEEPY_JOB,
    TINY_JOB,
    consumer_token,
    project_token,
    save_template,
    start_control_plane,
)

from common.client import (
    Client,
    Forbidden,
    InvalidArgument,
    MalformedAnswer,
    NotFound,
    RateLimited,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    Unreachable,
    WaitError,
    WaitTimeout,
)

pytestmark = pytest.mark.timeout(120)


async def facility_control_plane(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    """A control plane with projects alpha and beta, and a job that ends at once (tiny-job) and
    one that runs until it is stopped (sleepy-job)."""
    control_plane = await start_control_plane(aiohttp_client, tmp_path)
    for project in ("alpha", "beta"):
        await control_plane.create_project(project)
    await save_template(control_plane, TINY_JOB)
    await save_template(control_plane, SLEEPY_JOB)
    return control_plane


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await facility_control_plane(aiohttp_client, tmp_path)


async def client_of(cp: ControlPlane, project: str = "alpha", **options: Any) -> Client:
    return Client(cp.url, await project_token(cp, project), poll_s=0.05, **options)


def producer_key() -> bytes:
    return zmq.curve_keypair()[0]


async def state_of(cp: ControlPlane, session: str) -> str:
    return str((await (await cp.admin("GET", f"/api/v1/sessions/{session}")).json())["state"])


# --- sessions ------------------------------------------------------------------------------------

async def test_leaving_the_block_ends_the_sessions_the_client_opened(cp: ControlPlane) -> None:
    client = await client_of(cp)

    def work() -> tuple[str, str, str]:
        with client:
            kept = client.open_session(client_key=producer_key()).id
            ended = client.open_session(client_key=producer_key()).id
            client.end_session(ended)
            failing = client.open_session(client_key=producer_key()).id
            assert sorted(s.id for s in client.sessions()) == sorted([kept, ended, failing])
            raise RuntimeError("the notebook cell failed")

    with pytest.raises(RuntimeError, match="cell failed"):
        await asyncio.to_thread(work)
    states = [await state_of(cp, s.id) for s in await asyncio.to_thread(client.sessions)]
    assert states == ["ended", "ended", "ended"]


async def test_an_opened_session_names_its_project_and_gateway_but_shows_no_token(
        cp: ControlPlane) -> None:
    client = await client_of(cp)
    opened = await asyncio.to_thread(client.open_session, "4dstem", {"hwm": 64},
                                     client_key=producer_key(), ttl=600)
    assert (opened.project, opened.params["hwm"], opened.gateway.endpoint) == (
        "alpha", 64, cp.settings.gateway_endpoint)
    assert opened.token not in repr(opened) + json.dumps(opened.model_dump(mode="json"))
    assert "token" not in repr(client).lower() and client.project == "alpha"
    detail = await asyncio.to_thread(client.session, opened.id)
    assert (detail.state, detail.counters.jobs, detail.consumers) == ("open", 0, [])


# --- jobs ----------------------------------------------------------------------------------------

async def test_a_job_is_launched_listed_and_waited_for(cp: ControlPlane) -> None:
    client = await client_of(cp)

    def work() -> tuple[list[str], str, str]:
        session = client.open_session(client_key=producer_key()).id
        done = client.launch_job(session, "tiny-job", {"marker": "hi"})
        sleepy = client.launch_job(session, "sleepy-job", ranks=2)
        finished = client.wait_job(session, done.id, timeout_s=30)
        cancelled = client.cancel_job(session, sleepy.id)
        return ([j.id for j in client.jobs(session)], finished.state,
                client.wait_job(session, cancelled.id, timeout_s=30).state)

    listed, finished, cancelled = await asyncio.to_thread(work)
    assert len(listed) == 2 and (finished, cancelled) == ("succeeded", "cancelled")


async def test_a_wait_ends_with_a_timeout_or_at_once_when_the_job_cannot_deliver(
        cp: ControlPlane) -> None:
    client = await client_of(cp)
    session = await asyncio.to_thread(lambda: client.open_session(client_key=producer_key()).id)
    sleepy = await asyncio.to_thread(client.launch_job, session, "sleepy-job")
    with pytest.raises(WaitTimeout, match=f"waiting for job {sleepy.id} of session"):
        await asyncio.to_thread(client.wait_job, session, sleepy.id, 0.2)
    with pytest.raises(WaitTimeout, match=f"the ranks of job {sleepy.id} to register"):
        await asyncio.to_thread(client.wait_registered, session, sleepy.id, 0.2)

    tiny = await asyncio.to_thread(client.launch_job, session, "tiny-job")
    with pytest.raises(WaitError, match=r"with 0 of 1 ranks registered") as never:
        await asyncio.to_thread(client.wait_registered, session, tiny.id, 60)
    assert getattr(never.value.last, "state", None) == "succeeded"
    with pytest.raises(WaitError, match="recorded no result for scan 0") as none:
        await asyncio.to_thread(client.wait_result, session, 0, 60, job=tiny.id)
    assert not isinstance(none.value, WaitTimeout)


# --- scans ---------------------------------------------------------------------------------------

async def test_a_scans_file_and_checksum_are_read_once_recorded(cp: ControlPlane) -> None:
    client = await client_of(cp)
    session = await asyncio.to_thread(lambda: client.open_session(client_key=producer_key()).id)
    with pytest.raises(NotFound):
        await asyncio.to_thread(client.scan, session, 7)
    waiting = asyncio.create_task(asyncio.to_thread(client.wait_result, session, 7, 60))
    worker = await consumer_token(cp, await project_token(cp))
    response = await cp.call("POST", f"/api/v1/sessions/{session}/scans/7/result", worker,
                             json=RESULT)
    assert response.status == 200, await response.text()
    result = await waiting
    assert (result.path, result.sha256, result.complete, result.source) == (
        RESULT["path"], RESULT["sha256"], True, "consumer")
    assert [s.scan for s in await asyncio.to_thread(client.scans, session=session)] == [7]


# --- failures ------------------------------------------------------------------------------------

async def test_each_refusal_is_the_error_its_status_names_without_the_token(
        cp: ControlPlane) -> None:
    alpha, beta = await client_of(cp, "alpha"), await client_of(cp, "beta")
    session = await asyncio.to_thread(lambda: alpha.open_session(client_key=producer_key()).id)
    with pytest.raises(NotFound, match="^GET /api/v1/sessions/s0123456789: 404 "):
        await asyncio.to_thread(alpha.session, "s0123456789")
    with pytest.raises(Forbidden, match=f"^GET /api/v1/sessions/{session}: 403 "):
        await asyncio.to_thread(beta.session, session)
    issued = await cp.project_token("alpha")
    await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")
    revoked = Client(cp.url, issued["token"])
    with pytest.raises(Unauthorized, match="revoked") as refused:
        await asyncio.to_thread(revoked.sessions)
    assert issued["token"] not in str(refused.value) + repr(refused.value.args)


async def test_a_token_of_another_kind_or_a_bad_url_is_refused_before_asking(
        cp: ControlPlane) -> None:
    with pytest.raises(InvalidArgument, match="is an admin token; the client takes a project"):
        Client(cp.url, cp.admin_token)
    with pytest.raises(InvalidArgument, match=r"http\(s\)://HOST:PORT"):
        Client("file:///etc/passwd", await project_token(cp))


def test_an_unreachable_control_plane_is_retried_then_unreachable(
        free_port: Callable[[], int]) -> None:
    slept: list[float] = []
    client = Client(f"http://127.0.0.1:{free_port()}", "t", sleep=slept.append)
    with pytest.raises(Unreachable, match="cannot reach the control plane"):
        client.sessions()
    assert slept == [0.5, 1.0, 2.0]


async def test_a_rate_limit_is_waited_out_as_retry_after_says_or_raised_when_too_long(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    slept: list[float] = []
    for limit, expected in (("1/second", [1.0, 1.0, 2.0]), ("1/hour", [])):
        policy = write_policy(tmp_path / limit.replace("/", "-"), per_project=limit)
        cp = await start_control_plane(aiohttp_client, tmp_path / limit.replace("/", "-"),
                                       policy_path=policy)
        await cp.create_project("alpha")
        client = await client_of(cp, sleep=slept.append)
        await asyncio.to_thread(client.sessions)  # the one request the limit allows
        slept.clear()
        with pytest.raises(RateLimited) as limited:
            await asyncio.to_thread(client.sessions)
        assert limited.value.retry_after_s is not None and slept == expected, limit


async def test_an_answer_unlike_the_api_names_the_fields_not_their_values(
        aiohttp_client: ClientFactory) -> None:
    async def sessions(_request: web.Request) -> web.Response:
        return web.json_response({"items": [{"id": "s1", "token": "secret-value"}]})

    app = web.Application()
    app.router.add_get("/api/v1/sessions", sessions)
    server = await aiohttp_client(app)
    client = Client(str(server.make_url("")).rstrip("/"), "t", project="alpha")
    with pytest.raises(MalformedAnswer, match=r"a listed item\) is malformed: project: ") as bad:
        await asyncio.to_thread(client.sessions)
    assert "secret-value" not in str(bad.value)


async def test_a_failing_service_is_asked_again_only_where_that_cannot_do_a_thing_twice(
        aiohttp_client: ClientFactory) -> None:
    """A stand-in service (the real one fails so only under faults): 503 with Retry-After on
    reads, 500 on opening a session."""
    asked: list[str] = []

    async def unavailable(request: web.Request) -> web.Response:
        asked.append(request.method)
        if request.method == "GET":
            return web.json_response({"title": "Store unavailable"}, status=503,
                                     headers={"Retry-After": "2"})
        return web.json_response({"title": "Internal error"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/api/v1/sessions", unavailable)
    server = await aiohttp_client(app)
    slept: list[float] = []
    client = Client(str(server.make_url("")).rstrip("/"), "t", project="alpha",
                    sleep=slept.append)
    with pytest.raises(ServiceUnavailable, match="503 Store unavailable") as read:
        await asyncio.to_thread(client.sessions)
    assert (read.value.retry_after_s, slept, asked) == (2.0, [2.0, 2.0, 2.0], ["GET"] * 4)
    slept.clear()
    asked.clear()
    # The first open may have taken effect before the 500: a second would open another session.
    with pytest.raises(ServiceError, match="500 Internal error"):
        await asyncio.to_thread(client.open_session, client_key=producer_key())
    assert (slept, asked) == ([], ["POST"])
