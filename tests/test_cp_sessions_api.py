"""Sessions, consumers, jobs and scan results through the REST API: a real app on real SQLite.

Covers opening (render, token once, audit), parameter errors, template permissions, the session
quota, cross-project refusals on every route, consumer leases against a moved clock, ending and
expiry, consumer jobs through the real local launcher and a fake Slurm, and scan results.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from cp_helpers import CLIENT_SCOPE, SHIPPED_POLICY, ClientFactory, ControlPlane, sql
from cp_helpers import start_control_plane as start
from fake_slurm import FakeSlurm
from waiting import eventually_async

from common.config import load_config
from common.errors import InvalidSetting
from common.keys import create_keypair, load_keypair
from common.protocol import MAX_MANIFEST
from controlplane.sessions.core import (
    ConsumerRecord,
    admission_problem,
    lease_state,
    lease_until,
    session_state,
)
from controlplane.sessions.models import MAX_REPORT_BYTES
from controlplane.settings import Settings
from controlplane.tokens import Surface, TokenKind

WORKER_SCOPE = CLIENT_SCOPE + " scans:read consumers:register scans:report"
SHA = hashlib.sha256(b"scan").hexdigest()
RESULT = {"path": "/data/out/scan-7.h5", "sha256": SHA, "frames": 16, "events": 120,
          "expected_sectors": 64, "received_sectors": 64, "duplicate_sectors": 0,
          "conflicting_duplicates": 0, "lost_sectors": 0, "incomplete_frames": 0,
          "status": "complete", "loss_manifest": [], "manifest_truncated": False}
TINY_JOB = """\
name: tiny-job
kind: job
description: A test job that checks its files and writes a marker.
parameters:
  marker:
    type: string
    pattern: "[a-z]{1,16}"
    default: done
body: |
  #!/bin/bash
  set -eu
  [ "$(stat -c %a "$DSN_CONSUMER_TOKEN_FILE")" = 600 ]
  [ "$(stat -c %a {{ system.config_path | shquote }})" = 600 ]
  echo {{ params.marker | shquote }} > {{ system.output_dir | shquote }}/marker
"""


def policy_file(directory: Path, *, templates: dict[str, list[str]] | None = None) -> Path:
    """The shipped policy, letting project tokens hand consumer scopes on through exchange."""
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document["roles"]["client"] += ["consumers:register", "scans:report"]
    document["rate_limits"] = {"per_token": "10000/second", "per_project": "10000/second"}
    if templates is not None:
        document["templates"]["projects"] = templates
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def start_control_plane(aiohttp_client: ClientFactory, tmp_path: Path,
                              **overrides: Any) -> ControlPlane:
    keys = tmp_path / "keys"
    if not (keys / "gateway.key").exists():
        create_keypair(keys, "gateway")
    overrides.setdefault("policy_path", policy_file(tmp_path / "policy"))
    return await start(aiohttp_client, tmp_path / "state", gateway_key_file=keys / "gateway.key",
                       **overrides)


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    control_plane = await start_control_plane(aiohttp_client, tmp_path)
    await control_plane.create_project("alpha")
    await control_plane.create_project("beta")
    return control_plane


def client_key() -> str:
    return zmq.curve_keypair()[0].decode()


async def project_token(cp: ControlPlane, project: str = "alpha") -> str:
    return str((await cp.project_token(project, scope=WORKER_SCOPE))["token"])


async def open_session(cp: ControlPlane, token: str, project: str = "alpha",
                       **body: Any) -> Any:
    payload = {"project": project, "template": "4dstem", "params": {}, "client_key": client_key(),
               **body}
    return await cp.call("POST", "/api/v1/sessions", token, json=payload)


async def opened(cp: ControlPlane, project: str = "alpha") -> tuple[str, dict[str, Any]]:
    """A project token and a freshly opened session of ``project``."""
    token = await project_token(cp, project)
    response = await open_session(cp, token, project)
    assert response.status == 201, await response.text()
    return token, dict(await response.json())


async def consumer_token(cp: ControlPlane, token: str) -> str:
    return str((await cp.exchange(token, kind="consumer"))["token"])


async def register(cp: ControlPlane, worker: str, session: str, rank: int = 0,
                   endpoint: str = "tcp://127.0.0.1:6001", job_id: str = "job-1") -> Any:
    return await cp.call("POST", f"/api/v1/sessions/{session}/consumers", worker,
                         json={"endpoint": endpoint, "rank": rank, "job_id": job_id,
                               "host": "node-1"})


def expiry(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the pure core -------------------------------------------------------------------------------

def test_session_and_lease_states_are_pure_functions_of_the_clock() -> None:
    assert [session_state(None, 100.0, now) for now in (99.9, 100.0)] == ["open", "expired"]
    assert session_state(50.0, 100.0, 10.0) == "ended"
    assert [lease_state(None, 40.0, now) for now in (39.0, 40.0)] == ["live", "expired"]
    assert lease_state(30.0, 40.0, 10.0) == "left"
    assert lease_until(100.0, 30, 1000.0) == 130.0
    assert lease_until(100.0, 30, 110.0) == 110.0  # never beyond the session


def test_admission_refuses_a_taken_rank_or_endpoint_and_a_full_session() -> None:
    def consumer(rank: int, endpoint: str, job: str = "j") -> ConsumerRecord:
        return ConsumerRecord("c", "s", job, rank, endpoint, "h", 0.0, 10.0, None)
    live = [consumer(0, "tcp://127.0.0.1:1")]
    assert "rank 0" in str(admission_problem(live, consumer(0, "tcp://127.0.0.1:2"), 8))
    assert "endpoint" in str(admission_problem(live, consumer(1, "tcp://127.0.0.1:1"), 8))
    assert "quota" in str(admission_problem(live, consumer(1, "tcp://127.0.0.1:2"), 1))
    assert admission_problem(live, consumer(0, "tcp://127.0.0.1:2", job="k"), 8) is None


# --- opening -------------------------------------------------------------------------------------

async def test_open_session_renders_the_config_and_returns_the_token_once(
        cp: ControlPlane, tmp_path: Path) -> None:
    token = await project_token(cp)
    key = client_key()
    response = await open_session(cp, token, client_key=key, params={"hwm": 64})
    assert response.status == 201, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    session = body["config"]["sessions"][0]
    assert (session["id"], session["client_keys"]) == (body["id"], [key])
    assert session["limits"]["hwm"] == 64
    assert session["consumers"] == [] and body["state"] == "open"
    assert body["gateway"] == {"name": None, "endpoint": "tcp://127.0.0.1:5555", "server_key":
                               load_keypair(tmp_path / "keys" / "gateway.key").public.decode(),
                               "plain_endpoint": None,
                               "receipts_endpoint": "tcp://127.0.0.1:5556"}
    # No gateway registered: the configured one, as on a single-gateway site.
    assert (body["gateway_name"], body["previous_gateway"], body["replaced_at"], body["lanes"]) == (
        None, None, None, [])
    assert session["plain_password_sha256"] is None  # encrypted transport only, by default
    assert body["config"]["gateway"]["server_secret_key_file"] == str(
        (tmp_path / "keys" / "gateway.key_secret").resolve())

    claims = cp.services.tokens.verify(body["token"], Surface(cp.settings.gateway_audience,
                                                             frozenset({TokenKind.SESSION})))
    assert (claims.project, claims.exp) == ("alpha", expiry(body["expires_at"]))
    assert body["expires_at"] == body["token_expires_at"]
    inspected = await (await cp.call("GET", response.headers["Location"], token)).json()
    assert "token" not in inspected and inspected["id"] == body["id"]
    assert sql(cp.database, "SELECT kind, revoked_at FROM tokens WHERE jti = ?",
               (claims.jti,)) == [("session", None)]
    assert cp.audit_rows()[-2][2:6] == ("sessions:open", "session/alpha/4dstem", "allow",
                                        "clients-work-in-their-project")


async def test_a_session_lives_no_longer_than_asked_nor_than_its_project_token(
        cp: ControlPlane) -> None:
    token = await project_token(cp)
    body = await (await open_session(cp, token, ttl=600)).json()
    assert expiry(body["expires_at"]) == int(cp.clock()) + 600
    assert expiry(body["config"]["sessions"][0]["expires_at"]) == expiry(body["expires_at"])
    short = await cp.project_token("alpha", scope=WORKER_SCOPE, ttl=120)
    body = await (await open_session(cp, short["token"], ttl=600)).json()
    assert cp.clock() + 100 < expiry(body["expires_at"]) <= expiry(short["expires_at"])


@pytest.mark.parametrize(("change", "field"), [
    ({"params": {"hwm": 0, "sources": ["10.0.0.0/8"], "nope": 1}}, "params.hwm"),
    ({"client_key": "not-a-curve-key"}, "client_key"),
    ({"template": "local-mpiexec"}, "template"),
    ({"template": "missing"}, "template"),
    ({"extra": True}, "extra"),
])
async def test_bad_requests_are_400_with_field_errors(cp: ControlPlane, change: dict[str, Any],
                                                      field: str) -> None:
    response = await open_session(cp, await project_token(cp), **change)
    assert response.status == 400, await response.text()
    fields = [error["field"] for error in (await response.json())["errors"]]
    assert field in fields
    if field == "params.hwm":
        assert {"params.sources", "params.nope"} <= set(fields)  # every problem at once
    assert sql(cp.database, "SELECT COUNT(*) FROM sessions") == [(0,)]


async def test_a_template_the_project_may_not_use_is_403(aiohttp_client: ClientFactory,
                                                         tmp_path: Path) -> None:
    policy = policy_file(tmp_path / "strict", templates={"alpha": ["local-*"]})
    cp = await start_control_plane(aiohttp_client, tmp_path, policy_path=policy)
    await cp.create_project("alpha")
    response = await open_session(cp, await project_token(cp))
    assert response.status == 403
    assert cp.audit_rows()[-1][2:6] == ("sessions:open", "session/alpha/4dstem", "deny",
                                        "template-not-allowed")


async def test_the_session_quota_is_409_until_a_session_ends(cp: ControlPlane) -> None:
    assert (await cp.admin("PATCH", "/api/v1/projects/alpha",
                           json={"quotas": {"sessions": 1}})).status == 200
    token, first = await opened(cp)
    refused = await open_session(cp, token)
    assert refused.status == 409 and "quota of 1" in (await refused.json())["detail"]
    assert (await cp.call("DELETE", f"/api/v1/sessions/{first['id']}", token)).status == 200
    assert (await open_session(cp, token)).status == 201


async def test_a_client_key_serves_one_open_session(cp: ControlPlane) -> None:
    token, key = await project_token(cp), client_key()
    assert (await open_session(cp, token, client_key=key)).status == 201
    assert (await open_session(cp, token, client_key=key)).status == 409


async def test_sessions_are_listed_per_project_and_all_for_admins(cp: ControlPlane) -> None:
    alpha, _ = await opened(cp, "alpha")
    await opened(cp, "beta")
    own = await (await cp.call("GET", "/api/v1/sessions", alpha)).json()
    assert [s["project"] for s in own["items"]] == ["alpha"]
    every = await (await cp.admin("GET", "/api/v1/sessions")).json()
    assert sorted(s["project"] for s in every["items"]) == ["alpha", "beta"]
    only = await (await cp.admin("GET", "/api/v1/sessions?project=beta")).json()
    assert [s["project"] for s in only["items"]] == ["beta"]


# --- cross-project access: 403 on every route ----------------------------------------------------

CROSS = [("GET", "", None), ("DELETE", "", None), ("POST", "/jobs", {"template": "tiny-job"}),
         ("GET", "/jobs", None), ("GET", "/jobs/j1", None), ("DELETE", "/jobs/j1", None)]
CROSS_CONSUMER = [("POST", "/consumers", {"endpoint": "tcp://127.0.0.1:6001", "rank": 0,
                                          "job_id": "j", "host": "h"}),
                  ("PUT", "/consumers/c1", None), ("DELETE", "/consumers/c1", None),
                  ("POST", "/scans/1/result", RESULT)]


@pytest.mark.parametrize(("method", "suffix", "body"), CROSS + CROSS_CONSUMER)
async def test_another_projects_session_is_403_everywhere(cp: ControlPlane, method: str,
                                                          suffix: str, body: Any) -> None:
    _, session = await opened(cp, "alpha")
    beta = await project_token(cp, "beta")
    token = await consumer_token(cp, beta) if (method, suffix, body) in CROSS_CONSUMER else beta
    response = await cp.call(method, f"/api/v1/sessions/{session['id']}{suffix}", token,
                             json=body)
    assert response.status == 403, await response.text()
    assert cp.audit_rows()[-1][4:6] == ("deny", "cross-project")
    assert cp.audit_rows()[-1][3].startswith(("session/alpha/", "scan/alpha/"))


async def test_listing_another_projects_sessions_or_scans_is_403(cp: ControlPlane) -> None:
    _, session = await opened(cp, "alpha")
    beta = await project_token(cp, "beta")
    for path in ("/api/v1/sessions?project=alpha", "/api/v1/scans?project=alpha",
                 f"/api/v1/scans?session={session['id']}"):
        assert (await cp.call("GET", path, beta)).status == 403, path
        assert cp.audit_rows()[-1][4:6] == ("deny", "cross-project")


async def test_an_unknown_session_is_404(cp: ControlPlane) -> None:
    token = await project_token(cp)
    response = await cp.call("GET", "/api/v1/sessions/s0123", token)
    assert response.status == 404


# --- consumers and leases ------------------------------------------------------------------------

async def test_consumer_registers_heartbeats_expires_and_leaves(cp: ControlPlane) -> None:
    token, session = await opened(cp)
    worker = await consumer_token(cp, token)
    path = f"/api/v1/sessions/{session['id']}"
    response = await register(cp, worker, session["id"])
    assert response.status == 201, await response.text()
    consumer = await response.json()
    assert consumer["state"] == "live" and response.headers["Location"].endswith(consumer["id"])
    taken = await register(cp, worker, session["id"], endpoint="tcp://127.0.0.1:6002")
    assert taken.status == 409  # rank 0 of job-1 is live
    detail = await (await cp.call("GET", path, token)).json()
    assert detail["config"]["sessions"][0]["consumers"] == ["tcp://127.0.0.1:6001"]

    cp.clock.advance(cp.settings.lease_s - 1)
    beat = await cp.call("PUT", f"{path}/consumers/{consumer['id']}", worker)
    assert beat.status == 200
    assert (await beat.json())["lease_expires_at"] > consumer["lease_expires_at"]
    cp.clock.advance(cp.settings.lease_s)  # no heartbeat: the lease lapses
    detail = await (await cp.call("GET", path, token)).json()
    assert detail["consumers"][0]["state"] == "expired"
    assert detail["counters"]["live_consumers"] == 0
    assert detail["config"]["sessions"][0]["consumers"] == []
    assert (await cp.call("PUT", f"{path}/consumers/{consumer['id']}", worker)).status == 409

    again = await (await register(cp, worker, session["id"])).json()  # rank 0 may come back
    left = await cp.call("DELETE", f"{path}/consumers/{again['id']}", worker)
    assert (await left.json())["state"] == "left"
    assert (await cp.call("DELETE", f"{path}/consumers/{again['id']}", worker)).status == 200


@pytest.mark.parametrize(("endpoint", "message"), [
    ("tcp://10.1.2.3:6001", "outside the session's allowed targets"),
    ("tcp://127.0.0.1:0", "port 0"),
    ("tcp://*:6001", "wildcard"),
])
async def test_an_endpoint_outside_the_targets_is_400(cp: ControlPlane, endpoint: str,
                                                      message: str) -> None:
    token, session = await opened(cp)
    response = await register(cp, await consumer_token(cp, token), session["id"],
                              endpoint=endpoint)
    assert response.status == 400
    problem = await response.json()
    assert problem["errors"][0]["field"] == "endpoint"
    assert message in problem["detail"] + problem["errors"][0]["message"]


async def test_project_tokens_cannot_register_consumers(cp: ControlPlane) -> None:
    token, session = await opened(cp)
    assert (await register(cp, token, session["id"])).status == 401


# --- ending and expiry ---------------------------------------------------------------------------

async def test_ending_a_session_revokes_its_token_at_once(cp: ControlPlane) -> None:
    token, session = await opened(cp)
    worker = await consumer_token(cp, token)
    path = f"/api/v1/sessions/{session['id']}"
    ended = await cp.call("DELETE", path, token)
    assert ended.status == 200 and (await ended.json())["state"] == "ended"
    [(revoked_at,)] = sql(cp.database, "SELECT t.revoked_at FROM tokens t JOIN sessions s "
                                       "ON s.token_jti = t.jti WHERE s.id = ?", (session["id"],))
    assert revoked_at == pytest.approx(cp.clock())
    assert (await register(cp, worker, session["id"])).status == 409
    assert (await cp.admin("DELETE", path)).status == 200  # idempotent, admin too


async def test_a_session_expires_with_the_clock(cp: ControlPlane) -> None:
    token = await project_token(cp)
    session = await (await open_session(cp, token, ttl=60)).json()
    cp.clock.advance(60)
    detail = await (await cp.call("GET", f"/api/v1/sessions/{session['id']}", token)).json()
    assert detail["state"] == "expired"
    worker = await consumer_token(cp, token)
    assert (await register(cp, worker, session["id"])).status == 409


# --- jobs ----------------------------------------------------------------------------------------

async def save_template(cp: ControlPlane, source: str) -> None:
    name = yaml.safe_load(source)["name"]
    response = await cp.admin("PUT", f"/api/v1/templates/{name}", json={"source": source},
                              headers={"If-None-Match": "*"})
    assert response.status in (200, 201), await response.text()


async def poll_job(cp: ControlPlane, token: str, location: str, timeout_s: float = 20) -> Any:
    async def ended() -> Any:
        job = await (await cp.call("GET", location, token)).json()
        assert job["state"] not in ("pending", "running"), job
        return job

    return await eventually_async(ended, timeout_s=timeout_s, what=f"job {location} to end",
                                  interval_s=0.05)


@pytest.mark.timeout(60)
async def test_a_local_job_runs_with_a_private_token_file_and_succeeds(cp: ControlPlane) -> None:
    await save_template(cp, TINY_JOB)
    token, session = await opened(cp)
    response = await cp.call("POST", f"/api/v1/sessions/{session['id']}/jobs", token,
                             json={"template": "tiny-job", "params": {"marker": "hello"}})
    assert response.status == 202, await response.text()
    job = await poll_job(cp, token, response.headers["Location"])
    workdir = cp.settings.jobs_dir / job["id"]
    assert job["state"] == "succeeded", (workdir / "job.log").read_text()
    assert (job["launcher"], job["template"], job["exit_code"]) == ("local", "tiny-job", 0)
    assert (workdir / "output" / "marker").read_text() == "hello\n"
    secret = (workdir / "token").read_text()
    assert (mode(workdir), mode(workdir / "token"), mode(workdir / "dsn.yaml")) == (
        0o700, 0o600, 0o600)
    assert secret not in (workdir / "job.sh").read_text()
    assert load_config(workdir / "dsn.yaml").sessions[0].id == session["id"]
    claims = cp.services.tokens.verify(secret, Surface(cp.settings.api_audience,
                                                       frozenset({TokenKind.CONSUMER})))
    assert (claims.project, claims.sub) == ("alpha", f"job:{job['id']}")
    assert "consumers:register" in claims.scope


SLEEPY_JOB = """\
name: sleepy-job
kind: job
description: A test job that runs until it is stopped.
parameters: {}
body: |
  #!/bin/bash
  exec sleep 600
"""


@pytest.mark.timeout(60)
async def test_a_sessions_jobs_are_listed_and_one_is_cancelled(cp: ControlPlane) -> None:
    await save_template(cp, SLEEPY_JOB)
    token, session = await opened(cp)
    jobs = f"/api/v1/sessions/{session['id']}/jobs"
    first, second = [await (await cp.call("POST", jobs, token, json={"template": "sleepy-job"})
                            ).json() for _ in range(2)]
    listed = await (await cp.call("GET", jobs, token)).json()
    assert [(j["id"], j["state"]) for j in listed["items"]] == [
        (first["id"], "running"), (second["id"], "running")]

    cancelled = await cp.call("DELETE", f"{jobs}/{first['id']}", token)
    assert cancelled.status == 200 and (await cancelled.json())["state"] == "cancelled"
    again = await cp.call("DELETE", f"{jobs}/{first['id']}", token)  # idempotent
    assert (await again.json())["state"] == "cancelled"
    job_token = (cp.settings.jobs_dir / first["id"] / "token").read_text()
    refused = await cp.call("POST", f"/api/v1/sessions/{session['id']}/consumers", job_token,
                            json={"endpoint": "tcp://127.0.0.1:6001", "rank": 0,
                                  "job_id": first["id"], "host": "h"})
    assert refused.status == 401
    listed = await (await cp.call("GET", jobs, token)).json()
    assert [j["state"] for j in listed["items"]] == ["cancelled", "running"]
    assert (await cp.call("DELETE", f"{jobs}/j-none", token)).status == 404


@pytest.mark.timeout(60)
async def test_an_ended_sessions_jobs_report_and_leave_within_the_drain_window_only(
        cp: ControlPlane) -> None:
    await save_template(cp, SLEEPY_JOB)
    token, session = await opened(cp)
    base = f"/api/v1/sessions/{session['id']}"
    job = await (await cp.call("POST", f"{base}/jobs", token,
                               json={"template": "sleepy-job"})).json()
    job_token = (cp.settings.jobs_dir / job["id"] / "token").read_text()
    rank0 = await (await register(cp, job_token, session["id"], job_id=job["id"])).json()
    assert (await cp.call("DELETE", base, token)).status == 200

    # Within the window the job's ranks report what they finish and leave, and nothing more.
    cp.clock.advance(cp.settings.drain_s - 1)
    reported = await cp.call("POST", f"{base}/scans/7/result", job_token, json=RESULT)
    assert reported.status == 200, await reported.text()
    again = await register(cp, job_token, session["id"], rank=1,
                           endpoint="tcp://127.0.0.1:6002", job_id=job["id"])
    assert again.status == 409 and "has ended" in (await again.json())["detail"]
    renewed = await cp.call("PUT", f"{base}/consumers/{rank0['id']}", job_token)
    assert renewed.status == 409
    left = await cp.call("DELETE", f"{base}/consumers/{rank0['id']}", job_token)
    assert left.status == 200 and (await left.json())["state"] == "left"

    # After it, the token is refused like any revoked one, and the refusal is audited.
    cp.clock.advance(1)
    late = await cp.call("POST", f"{base}/scans/8/result", job_token, json=RESULT)
    assert late.status == 401
    assert "revoked" in (await late.json())["detail"]
    [stored] = (await (await cp.call("GET", f"{base}/scans/7", token)).json())["items"]
    assert (stored["source"], stored["status"]) == ("consumer", "complete")
    assert (await cp.call("GET", f"{base}/scans/8", token)).status == 404
    assert sql(cp.database, "SELECT decision, rule FROM audit WHERE action = 'scans:report' "
                            "ORDER BY seq") == [("allow", "consumers-join-and-report"),
                                                ("deny", "token:revoked")]


async def test_job_parameters_are_checked_before_anything_runs(cp: ControlPlane) -> None:
    await save_template(cp, TINY_JOB)
    token, session = await opened(cp)
    response = await cp.call("POST", f"/api/v1/sessions/{session['id']}/jobs", token,
                             json={"template": "tiny-job", "params": {"marker": "NO\nPE"}})
    assert response.status == 400
    assert (await response.json())["errors"][0]["field"] == "params.marker"
    assert not cp.settings.jobs_dir.exists() or not any(cp.settings.jobs_dir.iterdir())


@pytest.mark.timeout(60)
async def test_job_states_survive_a_restart_and_a_local_job_cut_short_is_lost(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path)
    await cp.create_project("alpha")
    await save_template(cp, TINY_JOB)
    await save_template(cp, SLEEPY_JOB)
    token, session = await opened(cp)
    jobs = f"/api/v1/sessions/{session['id']}/jobs"
    done = (await cp.call("POST", jobs, token, json={"template": "tiny-job"})).headers["Location"]
    assert (await poll_job(cp, token, done))["state"] == "succeeded"
    running = await cp.call("POST", jobs, token, json={"template": "sleepy-job"})
    assert (await running.json())["state"] == "running"

    await cp.client.close()  # the control plane stops, and its local jobs with it
    again = await start_control_plane(aiohttp_client, tmp_path, clock=cp.clock)
    kept = await (await again.call("GET", done, token)).json()
    assert (kept["state"], kept["exit_code"]) == ("succeeded", 0)
    lost = await (await again.call("GET", running.headers["Location"], token)).json()
    assert (lost["state"], lost["exit_code"]) == ("lost", None)
    assert "the control plane restarted while this job ran" in lost["detail"]
    assert sql(again.database, "SELECT state FROM jobs ORDER BY submitted_at") == [
        ("succeeded",), ("lost",)]


def test_an_unknown_launcher_is_an_invalid_setting(tmp_path: Path) -> None:
    with pytest.raises(InvalidSetting,
                       match="launcher: 'nope': unknown launcher; known: local, slurm"):
        Settings(state_dir=tmp_path / "state", launcher="nope")


# --- results -------------------------------------------------------------------------------------

async def test_results_are_recorded_once_and_listed_by_project(cp: ControlPlane) -> None:
    token, session = await opened(cp)
    worker = await consumer_token(cp, token)
    path = f"/api/v1/sessions/{session['id']}/scans/7/result"
    first = await cp.call("POST", path, worker, json=RESULT)
    assert first.status == 200, await first.text()
    assert (await cp.call("POST", path, worker, json=RESULT)).status == 200
    assert (await cp.call("POST", path, worker, json={**RESULT, "events": 121})).status == 409
    listed = await (await cp.call("GET", "/api/v1/scans?project=alpha", token)).json()
    assert [(r["session"], r["scan"], r["events"]) for r in listed["items"]] == [
        (session["id"], 7, 120)]
    assert (await (await cp.admin("GET", "/api/v1/scans?project=beta")).json())["items"] == []
    detail = await (await cp.call("GET", f"/api/v1/sessions/{session['id']}", token)).json()
    assert (detail["counters"]["scans"], detail["counters"]["events"]) == (1, 120)


async def test_a_scan_whose_file_could_not_be_written_is_recorded_failed_with_its_reason(
        cp: ControlPlane) -> None:
    token, session = await opened(cp)
    failed = {**RESULT, "sha256": "", "status": "failed", "reason": "No space left on device"}
    response = await cp.call("POST", f"/api/v1/sessions/{session['id']}/scans/2/result",
                             await consumer_token(cp, token), json=failed)
    assert response.status == 200, await response.text()
    [listed] = (await (await cp.call("GET", "/api/v1/scans?project=alpha", token)).json())["items"]
    assert (listed["status"], listed["sha256"], listed["reason"]) == (
        "failed", "", "No space left on device")


def _streamed(body: dict[str, Any], pad_to: int = 0) -> dict[str, Any]:
    """Request arguments sending ``body`` as JSON from a stream (aiohttp's client warns about
    bodies over 1 MiB given as bytes), padded with spaces to ``pad_to`` bytes."""
    data = json.dumps(body).encode()
    return {"data": io.BytesIO(data.ljust(pad_to)),
            "headers": {"Content-Type": "application/json"}}


async def test_a_results_loss_manifest_is_in_the_scans_detail_however_long(
        cp: ControlPlane) -> None:
    token, session = await opened(cp)
    worker = await consumer_token(cp, token)
    base = f"/api/v1/sessions/{session['id']}/scans"
    lost = [[frame, sector, "not_received"] for frame in range(MAX_MANIFEST // 4 + 1)
            for sector in range(4)]
    report = {**RESULT, "status": "partial", "received_sectors": 0, "lost_sectors": len(lost),
              "incomplete_frames": len(lost) // 4, "loss_manifest": lost[:MAX_MANIFEST],
              "manifest_truncated": True}
    response = await cp.call("POST", f"{base}/4/result", worker, **_streamed(report))  # 1.6 MB
    assert response.status == 200, await response.text()
    [detail] = (await (await cp.call("GET", f"{base}/4", token)).json())["items"]
    assert (detail["loss_manifest"], detail["manifest_truncated"]) == (lost[:MAX_MANIFEST], True)
    # Stored as reported: the same report again is the same result, not a conflict.
    again = await cp.call("POST", f"{base}/4/result", worker, **_streamed(report))
    assert again.status == 200, await again.text()
    # The report's body is bounded all the same.
    padded = _streamed(report, pad_to=MAX_REPORT_BYTES + 1)
    assert (await cp.call("POST", f"{base}/5/result", worker, **padded)).status == 413


@pytest.mark.parametrize("change", [
    {"status": "partial", "lost_sectors": 1, "incomplete_frames": 1},
    {"status": "partial", "lost_sectors": 1, "incomplete_frames": 1,
     "loss_manifest": [[0, 64, "not_received"]]},
    {"sha256": "ABC"}, {"status": "complete", "lost_sectors": 3}, {"path": "relative.h5"},
    {"frames": -1}, {"sha256": ""}, {"status": "failed"}, {"status": "failed", "sha256": ""},
    {"reason": "why not"}, {"status": "failed", "sha256": "", "reason": ""}])
async def test_a_bad_result_is_400(cp: ControlPlane, change: dict[str, Any]) -> None:
    token, session = await opened(cp)
    response = await cp.call("POST", f"/api/v1/sessions/{session['id']}/scans/1/result",
                             await consumer_token(cp, token), json={**RESULT, **change})
    assert response.status == 400


@pytest.mark.timeout(60)
async def test_a_scheduler_down_at_start_up_delays_it_by_one_timeout_not_one_per_job(
        aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = FakeSlurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{slurm.bin}{os.pathsep}{os.environ['PATH']}")
    cp = await start_control_plane(aiohttp_client, tmp_path, launcher="slurm",
                                   slurm_timeout_s=0.5)
    await cp.create_project("alpha")
    token, session = await opened(cp)
    slurm.answer("squeue", stdout="RUNNING\n")
    for native in ("101", "102", "103"):
        slurm.answer("sbatch", stdout=f"{native}\n")
        response = await cp.call("POST", f"/api/v1/sessions/{session['id']}/jobs", token,
                                 json={"params": {"account": "lcls:xpp12345"}})
        assert response.status == 202, await response.text()
    await cp.client.close()

    slurm.answer("squeue", sleep=20)  # the controller is down: every call hangs
    asked_before = len(slurm.calls("squeue"))
    again = await start_control_plane(aiohttp_client, tmp_path, launcher="slurm",
                                      slurm_timeout_s=0.5, clock=cp.clock)
    assert len(slurm.calls("squeue")) - asked_before == 1
    assert sql(again.database, "SELECT state FROM jobs") == [("running",)] * 3
