"""Clients given several control-plane replicas: the facility ``Client``, the consumer's
``ControlPlaneClient`` and the admin CLI against the real control plane app, each replica a real
HTTP server on its own loopback port passing every request on to it (replicas share one state, as
replicas on one database do) and counting what reached it. A replica that is down refuses
connections; one that is hung accepts and never answers. Fail-over on a refused connection, the
replica that answered kept, every replica down named in one error, a POST that reached a hung
replica not sent to another, and bad lists refused in one line."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cp_helpers import ClientFactory, ControlPlane, served_on, start_control_plane
from test_cp_cli import assert_one_line_error, dsn
from test_cp_sessions_api import RESULT, consumer_token, opened, project_token
from test_facility_cli import Dsn
from test_facility_client import facility_control_plane, producer_key

from common.client import Client, InvalidArgument, NotConnected, Unreachable
from common.restclient import Replicas
from controlplane.launchers import SCRIPT_NAME
from dataplane.consumer.controlplane import ControlPlaneClient, Registration
from dataplane.consumer.errors import SetupError

pytestmark = pytest.mark.timeout(120)

# Short enough that a hung replica costs the test little; long enough for a loaded machine's
# answers from the live one.
HUNG_TIMEOUT_S = 1.0
_HOP_BY_HOP = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive"})


class Replica:
    """A replica's own address: a real HTTP server on a loopback port that passes each request
    on to the control plane and records it (``seen``); ``stop`` leaves the port refusing
    connections, as a replica that died does, and ``start`` serves it again."""

    def __init__(self, target: str, port: int) -> None:
        self.target = target
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.seen: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _forward(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path))
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with aiohttp.ClientSession() as http, http.request(
                request.method, self.target + request.path_qs, headers=headers,
                data=await request.read()) as answer:
            return web.Response(status=answer.status, body=await answer.read(), headers={
                k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP})


class HungReplica:
    """A replica that takes requests and never answers them (until the test ends)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.seen: list[tuple[str, str]] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._hang)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hang(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path))
        await self._release.wait()
        return web.Response(status=503)


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await facility_control_plane(aiohttp_client, tmp_path)


@pytest.fixture
async def replicas(cp: ControlPlane, free_port: Callable[[], int]
                   ) -> AsyncIterator[tuple[Replica, Replica]]:
    a, b = Replica(cp.url, free_port()), Replica(cp.url, free_port())
    async with contextlib.AsyncExitStack() as stack:
        for replica in (a, b):
            await replica.start()
            stack.push_async_callback(replica.stop)
        yield a, b


@pytest.fixture
async def hung(free_port: Callable[[], int]) -> AsyncIterator[HungReplica]:
    replica = HungReplica(free_port())
    await replica.start()
    yield replica
    await replica.stop()


@pytest.fixture
def dead(free_port: Callable[[], int]) -> str:
    """The URL of a replica that is down: nothing listens on its port."""
    return f"http://127.0.0.1:{free_port()}"


def no_sleep(_seconds: float) -> None:
    """The retries' pause, skipped: the tests count attempts, not seconds."""


# --- the facility client -------------------------------------------------------------------------

async def test_a_dead_first_replica_is_passed_over_and_the_live_one_kept(
        cp: ControlPlane, replicas: tuple[Replica, Replica], dead: str) -> None:
    live, _ = replicas
    client = Client(f"{dead},{live.url}", await project_token(cp))
    assert (client.urls, client.url) == ((dead, live.url), dead)

    def work() -> str:
        session = client.open_session(client_key=producer_key())
        client.sessions()
        client.session(session.id)
        client.end_session(session.id)
        return session.id

    session = await asyncio.to_thread(work)
    assert client.url == live.url
    path = f"/api/v1/sessions/{session}"
    assert live.seen == [("POST", "/api/v1/sessions"), ("GET", "/api/v1/sessions"),
                         ("GET", path), ("DELETE", path)]


async def test_a_replica_that_dies_mid_use_is_failed_over_and_the_answering_one_kept(
        cp: ControlPlane, replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    client = Client([a.url, b.url], await project_token(cp))
    session = (await asyncio.to_thread(client.open_session, client_key=producer_key())).id
    assert (len(a.seen), len(b.seen), client.url) == (1, 0, a.url)

    await a.stop()
    assert (await asyncio.to_thread(client.session, session)).id == session
    assert (len(a.seen), len(b.seen), client.url) == (1, 1, b.url)

    # A back again is not probed: the replica that answered stays in use.
    await a.start()
    await asyncio.to_thread(client.sessions)
    await asyncio.to_thread(client.end_session, session)
    assert (len(a.seen), len(b.seen), client.url) == (1, 3, b.url)


async def test_every_replica_down_is_one_error_naming_each(cp: ControlPlane, dead: str,
                                                            free_port: Callable[[], int]) -> None:
    other = f"http://127.0.0.1:{free_port()}"
    client = Client([dead, other], await project_token(cp), attempts=2, sleep=no_sleep)
    with pytest.raises(NotConnected) as down:
        await asyncio.to_thread(client.sessions)
    message = str(down.value)
    assert message.startswith("GET /api/v1/sessions: cannot reach the control plane at any of "
                              "its 2 replicas: "), message
    assert f"{dead} (" in message and f"{other} (" in message and "refused" in message
    assert "\n" not in message and down.value.retryable


async def test_a_post_that_reached_a_hung_replica_is_not_sent_to_another(
        cp: ControlPlane, replicas: tuple[Replica, Replica], hung: HungReplica) -> None:
    live, _ = replicas
    client = Client([hung.url, live.url], await project_token(cp), timeout_s=HUNG_TIMEOUT_S,
                    attempts=2, sleep=no_sleep)
    with pytest.raises(Unreachable) as timed_out:
        await asyncio.to_thread(client.open_session, client_key=producer_key())
    assert not isinstance(timed_out.value, NotConnected)
    assert f"at {hung.url}: timed out" in str(timed_out.value)
    # Asked once: the first may have been acted on, so neither the hung replica nor the live one
    # is asked again, and no session was opened twice (here: none at all).
    assert hung.seen == [("POST", "/api/v1/sessions")] and live.seen == []
    assert client.url == hung.url
    listed = await (await cp.admin("GET", "/api/v1/sessions?project=alpha")).json()
    assert listed["items"] == []


async def test_a_get_that_reached_a_hung_replica_goes_on_to_the_next(
        cp: ControlPlane, replicas: tuple[Replica, Replica], hung: HungReplica) -> None:
    live, _ = replicas
    client = Client([hung.url, live.url], await project_token(cp), timeout_s=HUNG_TIMEOUT_S,
                    attempts=1)
    assert await asyncio.to_thread(client.sessions) == []
    assert (hung.seen, live.seen) == ([("GET", "/api/v1/sessions")],
                                      [("GET", "/api/v1/sessions")])
    assert client.url == live.url


@pytest.mark.parametrize(("urls", "fragment"), [
    ("", "no control plane URL given"),
    ([], "no control plane URL given"),
    ("http://127.0.0.1:1,,http://127.0.0.1:2", "has an empty item"),
    ("http://127.0.0.1:1,", "has an empty item"),
    ("http://127.0.0.1:1,http://127.0.0.1:1/", "'http://127.0.0.1:1' is listed twice"),
    (["http://Host:1", "http://host:1"], "'http://host:1' is listed twice"),
    ("http://127.0.0.1:1,127.0.0.1:2", "'127.0.0.1:2' is not http(s)://HOST:PORT"),
    (["http://127.0.0.1:1,http://127.0.0.1:2"], "is not http(s)://HOST:PORT"),
    ("http://127.0.0.1:port", "is not http(s)://HOST:PORT"),
])
def test_a_bad_list_is_refused_before_anything_is_asked(urls: str | list[str],
                                                        fragment: str) -> None:
    with pytest.raises(InvalidArgument, match="^[^\n]*$") as refused:
        Client(urls, "a.b.c")
    assert fragment in str(refused.value)
    with pytest.raises(SetupError) as too:
        ControlPlaneClient(urls, "t")
    assert fragment in str(too.value)


def test_the_replicas_show_which_one_is_in_use() -> None:
    replicas = Replicas("http://cp1.example:8750/, https://cp2.example:8750")
    assert replicas.urls == ("http://cp1.example:8750", "https://cp2.example:8750")
    assert repr(replicas) == ("Replicas('http://cp1.example:8750,https://cp2.example:8750', "
                              "in use: 'http://cp1.example:8750')")


# --- the consumer ------------------------------------------------------------------------------

async def test_a_consumer_registers_and_reports_through_the_replica_that_is_up(
        cp: ControlPlane, replicas: tuple[Replica, Replica], dead: str) -> None:
    a, b = replicas
    token, session = await opened(cp)
    client = ControlPlaneClient(f"{dead},{a.url},{b.url}", await consumer_token(cp, token))
    me = Registration(endpoint="tcp://127.0.0.1:6001", rank=0, job_id="job-1", host="node-1")
    lease = await asyncio.to_thread(client.register, session["id"], me)
    assert client.base_url == a.url
    await a.stop()
    await asyncio.to_thread(client.heartbeat, session["id"], lease.consumer_id)
    await asyncio.to_thread(client.report, session["id"], 0, RESULT)
    assert client.base_url == b.url
    assert [method for method, _ in a.seen] == ["POST"]
    assert [method for method, _ in b.seen] == ["PUT", "POST"]
    results = await (await cp.admin("GET", f"/api/v1/sessions/{session['id']}/scans/0")).json()
    assert [item["source"] for item in results["items"]] == ["consumer"]


async def test_a_consumers_report_that_reached_a_hung_replica_is_not_sent_to_another(
        cp: ControlPlane, replicas: tuple[Replica, Replica], hung: HungReplica) -> None:
    live, _ = replicas
    token, session = await opened(cp)
    client = ControlPlaneClient([hung.url, live.url], await consumer_token(cp, token),
                                timeout_s=HUNG_TIMEOUT_S)
    with pytest.raises(Unreachable, match="timed out"):
        await asyncio.to_thread(client.report, session["id"], 0, RESULT)
    assert (len(hung.seen), live.seen) == (1, [])


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(240)
async def test_a_job_whose_own_replica_is_gone_registers_through_another(
        tmp_path: Path, free_port: Callable[[], int], dead: str) -> None:
    # The replica that launches the job names a URL where nothing answers as its own (it is
    # gone, as far as the job can tell) and the live one as another replica's.
    port = free_port()
    async with served_on(port) as serve:
        cp = await start_control_plane(
            serve, tmp_path / "state", port=port, public_url=dead,
            replica_urls=(f"http://127.0.0.1:{port}",),
            gateway_endpoint=f"tcp://127.0.0.1:{free_port()}")
        await cp.create_project("alpha")
        client = Client(cp.settings.base_url, await project_token(cp), poll_s=0.1)

        def work() -> tuple[str, str]:
            with client:
                session = client.open_session(client_key=producer_key())
                job = client.launch_job(session.id, "local-mpiexec", {"scans": 1}, ranks=2)
                detail = client.wait_registered(session.id, job.id, timeout_s=180)
                assert {c.rank for c in detail.consumers if c.job_id == job.id} == {0, 1}
                return session.id, job.id

        _session, job = await asyncio.to_thread(work)
        script = (cp.settings.jobs_dir / job / SCRIPT_NAME).read_text()
        assert f"export DSN_CONTROLPLANE_URL={dead},http://127.0.0.1:{port}\n" in script


# --- the command lines ---------------------------------------------------------------------------

async def test_dsn_commands_take_a_list_whose_first_replica_is_down(
        cp: ControlPlane, replicas: tuple[Replica, Replica], dead: str, tmp_path: Path) -> None:
    live, _ = replicas
    user = Dsn(f"{dead},{live.url}", await project_token(cp), tmp_path)  # DSN_CONTROLPLANE_URL
    assert "SESSION" in await user.ok("sessions", "list")
    await user.ok("scans", "list", "--controlplane", f"{dead}, {live.url}")
    assert live.seen == [("GET", "/api/v1/sessions"), ("GET", "/api/v1/scans")]


async def test_the_admin_cli_takes_a_list_whose_first_replica_is_down(
        cp: ControlPlane, replicas: tuple[Replica, Replica], dead: str) -> None:
    live, _ = replicas
    env = {"DSN_ADMIN_TOKEN": cp.admin_token}
    result = await asyncio.to_thread(dsn, "admin", "projects", "list", "--json", "--url",
                                     f"{dead},{live.url}", env=env)
    assert result.exit_code == 0, result.output
    assert "alpha" in result.stdout and live.seen == [("GET", "/api/v1/projects")]
    result = await asyncio.to_thread(dsn, "admin", "projects", "list", env={
        **env, "DSN_CONTROLPLANE_URL": f"{dead},{live.url}"})
    assert result.exit_code == 0, result.output


def test_the_admin_cli_names_every_replica_down(dead: str, free_port: Callable[[], int]) -> None:
    other = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(dsn("admin", "projects", "list", "--url", f"{dead},{other}",
                              env={"DSN_ADMIN_TOKEN": "a.b.c"}),
                          "GET /api/v1/projects: cannot reach the control plane at any of its "
                          "2 replicas", dead, other)


@pytest.mark.parametrize(("urls", "fragment"), [
    ("http://127.0.0.1:1,,http://127.0.0.1:2", "has an empty item"),
    ("http://127.0.0.1:1,http://127.0.0.1:1", "'http://127.0.0.1:1' is listed twice"),
    ("http://127.0.0.1:1,nowhere", "'nowhere' is not http(s)://HOST:PORT"),
])
@pytest.mark.parametrize(("command", "option"), [
    (["admin", "projects", "list"], "--url"),
    (["sessions", "list"], "--controlplane"),
    (["producer", "stream", "--project", "alpha"], "--controlplane"),
    (["login", "--out", "OUT"], "--controlplane"),
    (["consumer", "run", "--config", "CONFIG", "--session", "s", "--output-dir", "out"],
     "--controlplane"),
])
def test_a_bad_list_on_a_command_line_is_one_error_line(
        command: list[str], option: str, urls: str, fragment: str, tmp_path: Path) -> None:
    config = tmp_path / "dsn.yaml"
    config.write_text("version: 1\n")
    files = {"CONFIG": str(config), "OUT": str(tmp_path / "project.token")}
    args = [files.get(arg, arg) for arg in command]
    env = {"DSN_ADMIN_TOKEN": "a.b.c", "DSN_PROJECT_TOKEN": "a.b.c"}
    assert_one_line_error(dsn(*args, option, urls, env=env), f"error: {option}: ", fragment)
    # DSN_CONTROLPLANE_URL names the control plane of the commands that always have one.
    if command[0] not in ("producer", "login"):
        assert_one_line_error(dsn(*args, env={**env, "DSN_CONTROLPLANE_URL": urls}), fragment)


def test_help_explains_the_list_form() -> None:
    for command, option in ((["admin", "projects", "list"], "--url"),
                            (["sessions", "list"], "--controlplane"),
                            (["producer", "stream"], "--controlplane"),
                            (["login"], "--controlplane"),
                            (["consumer", "run"], "--controlplane")):
        text = " ".join(dsn(*command, "--help").stdout.split())
        assert f"{option} URL[,URL...]" in text, text
        assert "several replicas, all their URLs comma" in text, text
