"""``dsn sessions``, ``dsn jobs`` and ``dsn scans`` as a facility user runs them: real ``dsn``
subprocesses talking real HTTP to the real control plane app on a loopback port, with the local
launcher running the consumer jobs. Every command's table and ``--json`` answer, and the one-line
errors of bad input: an unknown session, a revoked or expired token, a token of another kind, two
tokens at once, and a control plane that does not answer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane
from test_cp_sessions_api import RESULT, consumer_token, project_token
from test_facility_client import facility_control_plane

from common.keys import create_keypair

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await facility_control_plane(aiohttp_client, tmp_path)


class Dsn:
    """``dsn`` run as a subprocess against one control plane, with one project token in the
    environment; ``run`` is awaited so that the in-process control plane keeps serving."""

    def __init__(self, url: str, token: str | None, tmp_path: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DSN_")}
        self.env["DSN_CONTROLPLANE_URL"] = url
        if token is not None:
            self.env["DSN_PROJECT_TOKEN"] = token
        self.token = token
        self.tmp_path = tmp_path

    async def run(self, *args: str, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "dsn", *args], capture_output=True,
            text=True, env={**self.env, **(env or {})}, timeout=60, check=False)
        if self.token is not None:
            assert self.token not in done.stdout + done.stderr
        return done

    async def ok(self, *args: str) -> str:
        done = await self.run(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args, "--json"))

    async def fails(self, *args: str, status: int = 1, env: dict[str, str] | None = None) -> str:
        """The one ``error: ...`` line of a command that fails with ``status``."""
        done = await self.run(*args, env=env)
        assert done.returncode == status, (done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        return lines[0]


@pytest.fixture
async def dsn(cp: ControlPlane, tmp_path: Path) -> Dsn:
    return Dsn(cp.url, await project_token(cp), tmp_path)


def producer_key(tmp_path: Path) -> Path:
    public, _secret = create_keypair(tmp_path / "keys", "cam")
    return public


async def opened(dsn: Dsn, *extra: str) -> dict[str, Any]:
    answer = await dsn.json("sessions", "open", "--client-key", str(producer_key(dsn.tmp_path)),
                            *extra)
    assert isinstance(answer, dict)
    return answer


def table(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


# --- sessions ------------------------------------------------------------------------------------

async def test_a_session_is_opened_listed_shown_and_ended(cp: ControlPlane, dsn: Dsn,
                                                          tmp_path: Path) -> None:
    key = producer_key(tmp_path)
    token_out = tmp_path / "session.token"
    printed = await dsn.ok("sessions", "open", "--client-key", str(key), "--param", "hwm=64",
                           "--ttl", "600", "--token-out", str(token_out))
    header, row = table(printed)
    assert header == ["SESSION", "EXPIRES", "GATEWAY", "SERVER", "KEY"]
    session = row[0]
    assert row[2] == cp.settings.gateway_endpoint
    assert oct(token_out.stat().st_mode & 0o777) == "0o600"
    assert token_out.read_text().strip() not in printed

    listed = table(await dsn.ok("sessions", "list"))
    assert listed[0][:3] == ["SESSION", "STATE", "TEMPLATE"]
    assert [(r[0], r[1], r[2]) for r in listed[1:]] == [(session, "open", "4dstem")]
    shown = await dsn.json("sessions", "show", session)
    assert (shown["id"], shown["state"], shown["params"]["hwm"]) == (session, "open", 64)
    assert shown["counters"]["jobs"] == 0 and "token" not in shown

    ended = await dsn.json("sessions", "end", session)
    assert ended["state"] == "ended"
    assert (await dsn.json("sessions", "end", session))["state"] == "ended"  # idempotent
    assert await dsn.json("sessions", "list", "--open") == []
    assert [s["state"] for s in await dsn.json("sessions", "list")] == ["ended"]


async def test_open_refuses_to_overwrite_a_token_file_and_names_bad_parameters(
        dsn: Dsn, tmp_path: Path) -> None:
    existing = tmp_path / "taken.token"
    existing.write_text("x")
    key = str(producer_key(tmp_path))
    line = await dsn.fails("sessions", "open", "--client-key", key, "--token-out", str(existing))
    assert line == f"error: {existing} exists; refusing to overwrite it"
    line = await dsn.fails("sessions", "open", "--client-key", key, "--param", "hwm=0")
    assert line.startswith("error: POST /api/v1/sessions: 400 ") and "params.hwm" in line


# --- jobs ----------------------------------------------------------------------------------------

async def test_a_job_is_launched_waited_for_listed_and_shown(dsn: Dsn) -> None:
    session = (await opened(dsn))["id"]
    launched = await dsn.json("jobs", "launch", session, "--template", "tiny-job",
                              "--param", "marker=hello")
    assert (launched["template"], launched["ranks"], launched["launcher"]) == (
        "tiny-job", 1, "local")
    job = launched["id"]
    waited = table(await dsn.ok("jobs", "wait", session, job, "--timeout", "30"))
    assert waited[0][:3] == ["JOB", "STATE", "TEMPLATE"] and waited[1][:2] == [job, "succeeded"]
    assert [(j["id"], j["state"]) for j in await dsn.json("jobs", "list", session)] == [
        (job, "succeeded")]
    shown = await dsn.json("jobs", "show", session, job)
    assert (shown["state"], shown["exit_code"]) == ("succeeded", 0)


async def test_waiting_reflects_a_cancelled_job_and_a_timeout_in_its_exit_status(
        dsn: Dsn) -> None:
    session = (await opened(dsn))["id"]
    job = (await dsn.json("jobs", "launch", session, "--template", "sleepy-job"))["id"]
    line = await dsn.fails("jobs", "wait", session, job, "--timeout", "0.5", status=124)
    assert line == f"error: timed out after 0.5 s waiting for job {job} of session {session} " \
                   "to finish"
    assert (await dsn.json("jobs", "cancel", session, job))["state"] == "cancelled"
    assert (await dsn.json("jobs", "cancel", session, job))["state"] == "cancelled"
    line = await dsn.fails("jobs", "wait", session, job)
    assert line == f"error: job {job} cancelled"
    assert (await dsn.json("sessions", "show", session))["state"] == "open"


async def test_waiting_for_ranks_fails_at_once_when_the_job_ends_without_them(dsn: Dsn) -> None:
    session = (await opened(dsn))["id"]
    job = (await dsn.json("jobs", "launch", session, "--template", "tiny-job"))["id"]
    line = await dsn.fails("jobs", "wait", session, job, "--registered", "--timeout", "60")
    assert line == f"error: job {job} is succeeded (exited with status 0) with 0 of 1 ranks " \
                   "registered"


# --- scans ---------------------------------------------------------------------------------------

async def test_scan_results_are_listed_and_shown_with_file_and_checksum(
        cp: ControlPlane, dsn: Dsn) -> None:
    session = (await opened(dsn))["id"]
    worker = await consumer_token(cp, dsn.token or "")
    lost = {**RESULT, "status": "partial", "lost_sectors": 1, "incomplete_frames": 1,
            "received_sectors": 63, "loss_manifest": [[3, 2, "not_received"]]}
    for scan, body in ((1, RESULT), (2, lost)):
        response = await cp.call("POST", f"/api/v1/sessions/{session}/scans/{scan}/result",
                                 worker, json=body)
        assert response.status == 200, await response.text()

    listed = table(await dsn.ok("scans", "list", "--session", session))
    assert listed[0] == ["SESSION", "SCAN", "SOURCE", "STATUS", "FRAMES", "LOST", "PATH"]
    assert listed[1:] == [[session, "1", "consumer", "complete", "16", "0", RESULT["path"]],
                          [session, "2", "consumer", "partial", "16", "1", RESULT["path"]]]
    assert len(await dsn.json("scans", "list", "--limit", "1")) == 1
    shown = table(await dsn.ok("scans", "show", session, "2"))
    assert RESULT["sha256"] in shown[1] and shown[1][-2:] == ["1", "entries"]
    detail = await dsn.json("scans", "show", session, "2")
    assert detail[0]["loss_manifest"] == [[3, 2, "not_received"]]
    line = await dsn.fails("scans", "show", session, "9")
    assert line.startswith(f"error: GET /api/v1/sessions/{session}/scans/9: 404 ")


# --- bad input: one line, exit status 1, never the token -----------------------------------------

@pytest.mark.parametrize("command", [["sessions", "show"], ["sessions", "end"],
                                     ["jobs", "list"], ["jobs", "launch"]])
async def test_an_unknown_session_is_one_line(dsn: Dsn, command: list[str]) -> None:
    line = await dsn.fails(*command, "s0123456789")
    assert "/api/v1/sessions/s0123456789" in line and ": 404 " in line, line


async def test_an_unknown_job_is_one_line(dsn: Dsn) -> None:
    session = (await opened(dsn))["id"]
    line = await dsn.fails("jobs", "show", session, "j-none")
    assert line.startswith(f"error: GET /api/v1/sessions/{session}/jobs/j-none: 404 ")


async def test_a_revoked_token_is_one_line(cp: ControlPlane, tmp_path: Path) -> None:
    issued = await cp.project_token("alpha")
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).status in (200, 204)
    line = await Dsn(cp.url, issued["token"], tmp_path).fails("sessions", "list")
    assert line.startswith("error: GET /api/v1/sessions: 401 ") and "revoked" in line, line


async def test_an_expired_token_is_one_line(cp: ControlPlane, tmp_path: Path) -> None:
    issued = await cp.project_token("alpha", ttl=60)
    cp.clock.advance(120)
    line = await Dsn(cp.url, issued["token"], tmp_path).fails("scans", "list")
    assert line.startswith("error: GET /api/v1/scans") and ": 401 " in line, line
    assert "expired" in line, line


async def test_a_token_of_another_kind_is_named(cp: ControlPlane, dsn: Dsn,
                                                tmp_path: Path) -> None:
    token_out = tmp_path / "session.token"
    await opened(dsn, "--token-out", str(token_out))
    session_token = token_out.read_text().strip()
    line = await Dsn(cp.url, session_token, tmp_path).fails("sessions", "list")
    assert line == "error: the token from $DSN_PROJECT_TOKEN is a session token; the client " \
                   "takes a project token"
    admin = Dsn(cp.url, None, tmp_path)
    line = await admin.fails("jobs", "list", "s1", "--project-token-file",
                             str(cp.settings.state_dir / "admin.token"))
    assert line.endswith("is an admin token; the client takes a project token")
    assert cp.admin_token not in line


async def test_two_tokens_or_none_are_refused(cp: ControlPlane, dsn: Dsn, tmp_path: Path) -> None:
    token_file = tmp_path / "project.token"
    token_file.write_text("abc.def.ghi\n")
    token_file.chmod(0o600)
    line = await dsn.fails("sessions", "list", "--project-token-file", str(token_file))
    assert line.startswith("error: two tokens given: --project-token-file")
    line = await Dsn(cp.url, None, tmp_path).fails("sessions", "list")
    assert line == "error: no token: give --project-token-file or set DSN_PROJECT_TOKEN"


async def test_an_unreachable_control_plane_is_one_line(dsn: Dsn,
                                                        free_port: Callable[[], int]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = await dsn.fails("sessions", "list", "--controlplane", url)
    assert line.startswith(f"error: GET /api/v1/sessions: cannot reach the control plane at {url}")
    line = await dsn.fails("scans", "list", "--controlplane", "ftp://example.org")
    assert "http(s)://HOST:PORT" in line, line


async def test_every_command_explains_itself_and_its_defaults(dsn: Dsn) -> None:
    for group, commands in (("sessions", ("open", "list", "show", "end")),
                            ("jobs", ("launch", "list", "show", "cancel", "wait")),
                            ("scans", ("list", "show"))):
        listed = await dsn.ok(group, "--help")
        for command in commands:
            assert command in listed
            text = " ".join((await dsn.ok(group, command, "--help")).split())
            assert "--controlplane" in text and "[default: http://127.0.0.1:8750]" in text
            assert "DSN_PROJECT_TOKEN" in text and "--json" in text
    assert "[default: 600.0" in " ".join((await dsn.ok("jobs", "wait", "--help")).split())
