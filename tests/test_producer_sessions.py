"""A producer opens its session over REST (registering its CURVE key) and streams into the gateway
the control plane names: ``common.client.Client``, ``ProducerSession`` and ``dsn producer stream
--controlplane``, against the real control plane app on a real loopback port. A small CURVE PULL
server holding the gateway's secret key stands in for the gateway at the session's endpoint."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner, Result
from cp_helpers import (
    ClientFactory,
    ControlPlane,
    free_state_endpoints,
    start_control_plane,
    write_policy,
)

from common.client import Client
from common.keys import create_keypair, load_keypair
from common.protocol import ProducerMessage, decode_producer_header
from common.restclient import RestError
from dataplane.cli import producer
from dataplane.producer import ProducerSession
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera

# 2 x 2 positions, 4 sectors: 4 producers each send scan_begin, 4 sectors and scan_end.
SCAN_SHAPE = "2x2"
SCAN_MESSAGES = 4 * (1 + 4 + 1)


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path,
             free_port: Callable[[], int]) -> ControlPlane:
    policy = write_policy(tmp_path / "policy", per_token="10000/second",
                          per_project="10000/second")
    # Free ports throughout, so that other control planes on this machine never collide with it.
    control_plane = await start_control_plane(
        aiohttp_client, tmp_path / "state", policy_path=policy,
        gateway_endpoint=f"tcp://127.0.0.1:{free_port()}",
        state_endpoints=free_state_endpoints())
    await control_plane.create_project("alpha")
    return control_plane


async def project_token(cp: ControlPlane) -> str:
    return str((await cp.project_token("alpha"))["token"])


def token_file(tmp_path: Path, token: str, mode: int = 0o600) -> Path:
    path = tmp_path / "project.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@dataclass
class StandInGateway:
    """A CURVE PULL server at the session endpoint, with the gateway's own secret key."""

    socket: zmq.Socket
    headers: list[ProducerMessage] = field(default_factory=list)

    def receive(self, count: int, timeout_s: float = 20) -> list[ProducerMessage]:
        """The decoded headers of the next ``count`` messages (raises if they do not come)."""
        for _ in range(count):
            if not self.socket.poll(round(timeout_s * 1000)):
                raise AssertionError(f"only {len(self.headers)} of {count} messages arrived")
            self.headers.append(decode_producer_header(self.socket.recv_multipart()[0]))
        return self.headers


@pytest.fixture
def gateway(cp: ControlPlane, zmq_context: zmq.Context) -> Iterator[StandInGateway]:
    secret_file = cp.settings.state_dir / "keys" / "server.key_secret"
    socket = zmq_context.socket(zmq.PULL)
    socket.curve_server = True
    socket.curve_secretkey = load_keypair(secret_file).secret
    socket.bind(cp.settings.gateway_endpoint)
    yield StandInGateway(socket)
    socket.close(linger=0)


async def session_detail(cp: ControlPlane, session_id: str) -> dict[str, Any]:
    response = await cp.admin("GET", f"/api/v1/sessions/{session_id}")
    assert response.status == 200, await response.text()
    return dict(await response.json())


def kinds(headers: list[ProducerMessage]) -> dict[str, int]:
    return dict(Counter(type(header).__name__ for header in headers))


# --- opening and ending a session with the client ------------------------------------------------

async def test_an_opened_session_names_the_gateway_and_registers_the_client_key(
        cp: ControlPlane) -> None:
    token = await project_token(cp)
    client = Client(cp.url, token)
    client_public = zmq.curve_keypair()[0]
    opened = await asyncio.to_thread(client.open_session, "4dstem", {"hwm": 64},
                                     client_key=client_public, ttl=600)
    server = load_keypair(cp.settings.state_dir / "keys" / "server.key")
    assert (opened.project, opened.gateway.endpoint, opened.gateway.server_key.encode()) == (
        "alpha", cp.settings.gateway_endpoint, server.public)
    assert client_public.decode() in json.dumps(opened.config)
    assert opened.expires_at.timestamp() == pytest.approx(cp.clock() + 600, abs=1)
    assert opened.token and opened.token not in repr(opened)
    assert opened.token not in json.dumps(opened.model_dump(mode="json"))
    detail = await session_detail(cp, opened.id)
    assert (detail["state"], detail["client_key"]) == ("open", client_public.decode())

    await asyncio.to_thread(client.end_session, opened.id)
    await asyncio.to_thread(client.end_session, opened.id)  # idempotent
    assert (await session_detail(cp, opened.id))["state"] == "ended"


async def test_bad_parameters_are_refused_with_their_fields(cp: ControlPlane) -> None:
    client = Client(cp.url, await project_token(cp))
    with pytest.raises(RestError, match=r"^POST /api/v1/sessions: 400 .*params\.hwm: ") as bad:
        await asyncio.to_thread(client.open_session, "4dstem", {"hwm": 0, "nope": 1},
                                client_key=zmq.curve_keypair()[0])
    error = bad.value
    assert (error.status, error.retryable, bool(error.title), bool(error.request_id)) == (
        400, False, True, True)
    assert {"params.hwm", "params.nope"} <= {name for name, _ in error.errors}
    assert error.request_id is not None and error.request_id in str(error)


async def test_a_bad_token_is_401_and_never_echoed(cp: ControlPlane) -> None:
    forged = "eyJhbGciOiJFZERTQSJ9.bm90LWEtdG9rZW4.c2lnbmF0dXJl"
    slept: list[float] = []
    client = Client(cp.url, forged, sleep=slept.append)
    with pytest.raises(RestError, match=r"^POST /api/v1/sessions: 401 ") as refused:
        await asyncio.to_thread(client.open_session, client_key=zmq.curve_keypair()[0],
                                project="alpha")
    assert refused.value.status == 401 and slept == []  # a refusal is not retried
    assert forged not in str(refused.value) and forged not in repr(refused.value.args)


def test_an_absent_control_plane_is_retried_with_backoff(free_port: Callable[[], int]) -> None:
    slept: list[float] = []
    with pytest.raises(RestError,
                       match="cannot reach the control plane at http://127.0.0.1:") as absent:
        Client(f"http://127.0.0.1:{free_port()}", "t", project="alpha", timeout_s=2,
               sleep=slept.append).open_session(client_key=zmq.curve_keypair()[0])
    assert (absent.value.status, slept) == (None, [0.5, 1.0, 2.0])


# --- ProducerSession -----------------------------------------------------------------------------

async def test_a_producer_session_streams_into_its_gateway_and_ends(
        cp: ControlPlane, gateway: StandInGateway, tmp_path: Path) -> None:
    _, secret_file = create_keypair(tmp_path / "producer", "cam")
    spec = CameraSpec(scan_shape=(2, 2), seed=3)
    plan = StreamPlan(spec, producers=spec.sectors, seed=3)
    token = await project_token(cp)
    session = ProducerSession(Client(cp.url, token), client=secret_file, end_on_exit=True)
    assert token not in repr(session) and token not in repr(session.controlplane)

    def run() -> str:
        with session:
            session.stream_synthetic(SyntheticCamera(spec), plan, scan=5, progress=False,
                                     send_timeout_s=10)
            return session.session.id

    session_id, headers = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(
        gateway.receive, SCAN_MESSAGES))
    assert kinds(headers) == {"ScanBegin": 4, "Data": 16, "ScanEnd": 4}
    assert {h.scan for h in headers} == {5}
    detail = await session_detail(cp, session_id)
    assert (detail["state"], detail["client_key"]) == ("ended", session.client.public.decode())


# --- dsn producer stream --controlplane ----------------------------------------------------------

def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(producer, ["stream", *args], catch_exceptions=False)


async def test_the_cli_opens_a_session_and_streams_the_scan_into_it(
        cp: ControlPlane, gateway: StandInGateway, tmp_path: Path) -> None:
    token = await project_token(cp)
    args = ["--controlplane", cp.url, "--project-token-file",
            str(token_file(tmp_path, token)), "--project", "alpha", "--param", "hwm=32",
            "--param", 'sources=["127.0.0.0/8"]', "--scan-shape", SCAN_SHAPE, "--scan", "9",
            "--no-progress", "--timeout", "10", "--end-session",
            "--no-receipt"]  # a bare PULL socket stands in for the gateway: no receipts
    result, headers = await asyncio.gather(asyncio.to_thread(invoke, args), asyncio.to_thread(
        gateway.receive, SCAN_MESSAGES))
    assert result.exit_code == 0, result.output
    assert kinds(headers) == {"ScanBegin": 4, "Data": 16, "ScanEnd": 4}
    first = result.output.splitlines()[0]
    assert first.startswith("session s") and first.endswith(
        f"gateway {cp.settings.gateway_endpoint}")
    assert "scan 9: 16 messages" in result.output and token not in result.output
    session_id = first.split()[1]
    detail = await session_detail(cp, session_id)
    assert (detail["state"], detail["params"]) == ("ended", {"hwm": 32,
                                                             "sources": ["127.0.0.0/8"]})


async def test_the_cli_opens_the_session_at_the_replica_that_is_up(
        cp: ControlPlane, gateway: StandInGateway, tmp_path: Path,
        free_port: Callable[[], int]) -> None:
    token = await project_token(cp)
    down = f"http://127.0.0.1:{free_port()}"  # a replica that is down: nothing listens there
    args = ["--controlplane", f"{down},{cp.url}", "--project-token-file",
            str(token_file(tmp_path, token)), "--scan-shape", SCAN_SHAPE, "--no-progress",
            "--timeout", "10", "--end-session", "--no-receipt"]
    result, headers = await asyncio.gather(asyncio.to_thread(invoke, args), asyncio.to_thread(
        gateway.receive, SCAN_MESSAGES))
    assert result.exit_code == 0, result.output
    assert kinds(headers) == {"ScanBegin": 4, "Data": 16, "ScanEnd": 4}
    detail = await session_detail(cp, result.output.split()[1])
    assert detail["state"] == "ended"  # --end-session reached the live replica too


async def test_the_cli_takes_the_token_from_the_environment_and_the_project_from_the_token(
        cp: ControlPlane, gateway: StandInGateway) -> None:
    token = await project_token(cp)
    args = ["--controlplane", cp.url, "--scan-shape", SCAN_SHAPE, "--no-progress",
            "--timeout", "10", "--no-receipt"]
    result, headers = await asyncio.gather(
        asyncio.to_thread(lambda: CliRunner().invoke(producer, ["stream", *args],
                                                     env={"DSN_PROJECT_TOKEN": token})),
        asyncio.to_thread(gateway.receive, SCAN_MESSAGES))
    assert result.exit_code == 0, result.output
    assert kinds(headers) == {"ScanBegin": 4, "Data": 16, "ScanEnd": 4}
    detail = await session_detail(cp, result.output.split()[1])
    assert detail["project"] == "alpha" and token not in result.output


async def test_the_cli_streams_into_a_session_opened_elsewhere_with_its_registered_key(
        cp: ControlPlane, gateway: StandInGateway, tmp_path: Path) -> None:
    token = await project_token(cp)
    public, secret = create_keypair(tmp_path / "keys", "microscope")
    client = Client(cp.url, token)
    opened = await asyncio.to_thread(client.open_session, "4dstem",
                                     client_key=load_keypair(public).public)
    tokens = str(token_file(tmp_path, token))
    args = ["--controlplane", cp.url, "--project-token-file", tokens, "--session", opened.id,
            "--client-key", str(secret), "--scan-shape", SCAN_SHAPE, "--no-progress",
            "--timeout", "10", "--no-receipt"]
    result, headers = await asyncio.gather(asyncio.to_thread(invoke, args), asyncio.to_thread(
        gateway.receive, SCAN_MESSAGES))
    assert result.exit_code == 0, result.output
    assert kinds(headers) == {"ScanBegin": 4, "Data": 16, "ScanEnd": 4}
    assert result.output.startswith(f"session {opened.id} ")
    # Another key pair: refused before anything is sent, naming the key.
    _, stranger = create_keypair(tmp_path / "keys", "stranger")
    refused = await asyncio.to_thread(invoke, [*args[:6], "--client-key", str(stranger)])
    assert refused.exit_code == 1
    assert f"session {opened.id} does not admit this producer's key" in refused.output
    await asyncio.to_thread(client.end_session, opened.id)
    ended = await asyncio.to_thread(invoke, args)
    assert ended.exit_code == 1 and f"session {opened.id} is ended" in ended.output


def test_a_token_file_and_the_environment_variable_together_are_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path, "abc.def.ghi")
    result = CliRunner().invoke(producer, ["stream", "--controlplane", "http://127.0.0.1:1",
                                           "--project-token-file", str(path)],
                                env={"DSN_PROJECT_TOKEN": "jkl.mno.pqr"})
    assert result.exit_code == 2 and "two tokens given" in result.output, result.output
    assert "abc.def.ghi" not in result.output and "jkl.mno.pqr" not in result.output


async def test_the_cli_reports_a_refused_session_without_the_token(cp: ControlPlane,
                                                                    tmp_path: Path) -> None:
    token = await project_token(cp)
    args = ["--controlplane", cp.url, "--project-token-file",
            str(token_file(tmp_path, token)), "--project", "alpha", "--param", "hwm=0"]
    result = await asyncio.to_thread(invoke, args)
    assert result.exit_code == 1
    assert "400" in result.output and "params.hwm" in result.output
    assert token not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--controlplane", "http://127.0.0.1:1", "--endpoint", "tcp://127.0.0.1:2", "--project",
      "alpha", "--project-token-file", "t"], "--endpoint is the gateway's own"),
    (["--controlplane", "http://127.0.0.1:1", "--project", "alpha"],
     "no token: give --project-token-file or set DSN_PROJECT_TOKEN"),
    (["--project", "alpha"], "--project needs --controlplane"),
    (["--end-session"], "--end-session needs --controlplane"),
    (["--endpoint", "tcp://127.0.0.1:2"], "--server-key, --client-key are required"),
    (["--spool", "SPOOL", "--seed", "3"], "--seed applies to synthetic scans"),
    (["--session", "s1"], "--session needs --controlplane"),
    (["--controlplane", "http://127.0.0.1:1", "--session", "s1", "--template", "tiny"],
     "--template opens a session; --session streams into an open one"),
    (["--controlplane", "http://127.0.0.1:1", "--session", "s1"],
     "--session needs --client-key"),
])
def test_the_two_modes_do_not_mix(tmp_path: Path, args: list[str], message: str) -> None:
    spool = tmp_path / "scan.spool"
    spool.write_bytes(b"")
    result = invoke([str(spool) if a == "SPOOL" else a for a in args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_shared_token_file_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path, "abc.def.ghi", mode=0o644)
    result = invoke(["--controlplane", "http://127.0.0.1:1", "--project-token-file", str(path),
                     "--project", "alpha"])
    assert result.exit_code == 2 and "readable by others" in result.output
    assert "abc.def.ghi" not in result.output
