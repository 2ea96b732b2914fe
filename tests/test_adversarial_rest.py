"""REST abuse against the real app (aiohttp test server, real SQLite): broken function- and
object-level authorization, mass assignment, body and header bombs, wrong content types.

Every answer must be a refusal (4xx, or a connection closed by the HTTP parser for a head over
its limits) and never a 5xx, and the service must still answer ``/healthz`` afterwards.
Already proven elsewhere and not repeated here: cross-project access to
``/api/v1/projects/{project}*`` (test_cp_api::test_cross_project_access_is_403), to another
project's sessions, jobs, consumers and results (test_cp_sessions_api::
test_another_projects_session_is_403_everywhere and
test_listing_another_projects_sessions_or_scans_is_403), template rendering outside a project's
allowed templates, template writes
(test_cp_templates_api::test_project_tokens_read_and_render_allowed_templates_and_never_write),
unknown body fields on project creation, a text/plain body and a 64 KiB+ body
(test_cp_api::test_invalid_bodies_name_the_field, test_body_must_be_small_json).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import (
    HTTP_LAYER_REFUSALS,
    ClientFactory,
    ControlPlane,
    http_layer_refusal,
    sql,
)
from test_cp_api import assert_problem
from test_cp_sessions_api import (
    RESULT,
    consumer_token,
    opened,
    project_token,
    register,
    start_control_plane,
)

from controlplane.middlewares import ROUTE_SPECS
from controlplane.views import ADMIN

MIB = 1 << 20
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    control_plane = await start_control_plane(aiohttp_client, tmp_path)
    for name in ("alpha", "beta"):
        await control_plane.create_project(name)
    return control_plane


async def assert_up(cp: ControlPlane) -> None:
    assert (await cp.client.get("/healthz")).status == 200


def state(cp: ControlPlane) -> list[list[tuple[Any, ...]]]:
    """Everything an admin function could change (the audit log aside)."""
    return [sql(cp.database, statement) for statement in (
        "SELECT * FROM projects ORDER BY name", "SELECT jti, revoked_at FROM tokens ORDER BY jti",
        "SELECT * FROM admins ORDER BY name",
        "SELECT kid, retired_at FROM signing_keys ORDER BY kid",
        "SELECT name, version FROM template_versions ORDER BY name, version",
        "SELECT id, ended_at FROM sessions ORDER BY id")]


# --- function level: admin functions with a project's tokens --------------------------------------

# The admin-only actions on routes that also take project tokens (for their own project's reads;
# template writes share their routes with the reads a project's members make in the console).
ADMIN_ACTIONS_ON_SHARED_ROUTES = [("PATCH", "/api/v1/projects/{project}"),
                                  ("POST", "/api/v1/projects/{project}/tokens"),
                                  ("PUT", "/api/v1/templates/{name}"),
                                  ("DELETE", "/api/v1/templates/{name}"),
                                  ("POST", "/api/v1/templates/{name}/rollback")]


def admin_functions(cp: ControlPlane) -> list[tuple[str, str]]:
    """Every admin-only route of the route table (so a new one is covered at once), plus the
    admin actions of shared routes."""
    routes = [(spec.method, spec.path) for spec in cp.client.app[ROUTE_SPECS].values()
              if spec.kinds == ADMIN]
    return sorted(routes) + ADMIN_ACTIONS_ON_SHARED_ROUTES


def concrete(path: str, jti: str) -> str:
    return path.format(project="alpha", jti=jti, name="4dstem", version=1, admin="admin")


async def test_project_and_consumer_tokens_reach_no_admin_function(cp: ControlPlane) -> None:
    token = await project_token(cp, "alpha")
    victim = (await cp.project_token("alpha", subject="victim"))["jti"]
    worker = await consumer_token(cp, token)
    functions = admin_functions(cp)
    assert len(functions) >= 19  # admins, projects, tokens, keys, policies, audit, templates
    before, audit_before = state(cp), len(cp.audit_rows())
    answers = []
    for method, path in functions:
        for who, bearer in (("project", token), ("consumer", worker)):
            response = await cp.call(method, concrete(path, victim), bearer, json={},
                                     headers={"If-Match": "*", "If-None-Match": "*"})
            answers.append((who, method, path, response.status))
            await assert_problem(response, response.status)
    # 429: a token kind refused at authentication counts against its address's allowance.
    refused = [answer for answer in answers if answer[3] not in (401, 403, 429)]
    assert refused == []
    # Each attempt is a deny on record: its own, or counted in its principal's summary.
    await cp.services.audit.flush_denials(everything=True)
    assert sql(cp.database, "SELECT decision, SUM(count) FROM audit WHERE seq > ? "
                            "GROUP BY decision", (audit_before,)) == [("deny", len(answers))]
    assert state(cp) == before
    await assert_up(cp)


# --- object level: identifiers of another project or session --------------------------------------

async def test_another_projects_scan_results_are_403(cp: ControlPlane) -> None:
    beta, session = await opened(cp, "beta")
    path = f"/api/v1/sessions/{session['id']}/scans/7"
    reported = await cp.call("POST", path + "/result", await consumer_token(cp, beta), json=RESULT)
    assert reported.status == 200, await reported.text()
    alpha = await project_token(cp, "alpha")
    await assert_problem(await cp.call("GET", path, alpha), 403)
    assert cp.audit_rows()[-1][4:6] == ("deny", "cross-project")
    assert (await cp.call("GET", path, beta)).status == 200  # the owner reads it


async def test_a_consumer_of_another_session_is_not_reachable_through_ones_own(
        cp: ControlPlane) -> None:
    """A consumer id of session B, named under session A's path by A's worker: not found, and
    B's consumer keeps its lease."""
    alpha, mine = await opened(cp, "alpha")
    beta, theirs = await opened(cp, "beta")
    beta_worker = await consumer_token(cp, beta)
    victim = await (await register(cp, beta_worker, theirs["id"])).json()
    alpha_worker = await consumer_token(cp, alpha)
    crossed = f"/api/v1/sessions/{mine['id']}/consumers/{victim['id']}"
    for method in ("PUT", "DELETE"):
        await assert_problem(await cp.call(method, crossed, alpha_worker), 404)
    detail = await (await cp.call("GET", f"/api/v1/sessions/{theirs['id']}", beta)).json()
    assert [(c["id"], c["state"]) for c in detail["consumers"]] == [(victim["id"], "live")]


# --- mass assignment: fields a client may not set -------------------------------------------------

MASS_ASSIGNMENT: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("POST", "/api/v1/projects", "admin", {"name": "m1", "created_at": "2020-01-01T00:00:00Z"},
     "created_at"),
    ("POST", "/api/v1/projects", "admin", {"name": "m2", "id": 1}, "id"),
    ("POST", "/api/v1/projects", "admin", {"name": "m3", "not_before": "2020-01-01T00:00:00Z"},
     "not_before"),
    ("PATCH", "/api/v1/projects/alpha", "admin", {"name": "renamed"}, "name"),
    ("PATCH", "/api/v1/projects/alpha", "admin", {"created_at": "2020-01-01T00:00:00Z"},
     "created_at"),
    ("POST", "/api/v1/projects/alpha/tokens", "admin", {"subject": "s", "project": "beta"},
     "project"),
    ("POST", "/api/v1/projects/alpha/tokens", "admin", {"subject": "s", "kind": "admin"}, "kind"),
    ("POST", "/api/v1/projects/alpha/tokens", "admin", {"subject": "s", "role": "administrator"},
     "role"),
    ("POST", "/api/v1/projects/alpha/tokens", "admin", {"subject": "s", "jti": "chosen"}, "jti"),
    ("POST", "/api/v1/token", "project", {"kind": "session", "project": "beta"}, "project"),
    ("POST", "/api/v1/token", "project", {"kind": "session", "sub": "admin"}, "sub"),
    ("POST", "/api/v1/token", "project", {"kind": "session", "token_use": "admin"}, "token_use"),
    ("POST", "/api/v1/token", "project", {"kind": "session", "status": "active"}, "status"),
    ("POST", "/api/v1/sessions", "project", {"id": "s-chosen"}, "id"),
    ("POST", "/api/v1/sessions", "project", {"status": "ended"}, "status"),
    ("POST", "/api/v1/sessions", "project", {"expires_at": "2099-01-01T00:00:00Z"}, "expires_at"),
    ("POST", "/api/v1/sessions", "project", {"scope": "tokens:write"}, "scope"),
    ("POST", "/api/v1/sessions/{session}/consumers", "consumer",
     {"lease_expires_at": "2099-01-01T00:00:00Z"}, "lease_expires_at"),
    ("POST", "/api/v1/sessions/{session}/consumers", "consumer", {"session_id": "s-other"},
     "session_id"),
    ("POST", "/api/v1/sessions/{session}/consumers", "consumer", {"state": "live"}, "state"),
    ("POST", "/api/v1/sessions/{session}/scans/3/result", "consumer", {"project": "beta"},
     "project"),
    ("POST", "/api/v1/sessions/{session}/scans/3/result", "consumer", {"source": "gateway"},
     "source"),
    ("POST", "/api/v1/templates/4dstem/render", "admin", {"params": {}, "version": 1},
     "version"),
]


async def _mass_assignment_bases(cp: ControlPlane) -> tuple[dict[str, str], dict[str, Any]]:
    """The tokens of each kind and, per path, the valid body the extra field is added to."""
    token, session = await opened(cp, "alpha")
    tokens = {"admin": cp.admin_token, "project": token,
              "consumer": await consumer_token(cp, token)}
    bases: dict[str, Any] = {
        "/api/v1/sessions": {"project": "alpha", "template": "4dstem", "params": {},
                             "client_key": "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"},
        "/api/v1/sessions/{session}/consumers": {"endpoint": "tcp://127.0.0.1:6001", "rank": 0,
                                                 "job_id": "j", "host": "h"},
        "/api/v1/sessions/{session}/scans/3/result": RESULT,
        "session": session["id"],
    }
    return tokens, bases


async def test_fields_a_client_may_not_set_are_400_naming_the_field(cp: ControlPlane) -> None:
    tokens, bases = await _mass_assignment_bases(cp)
    before = state(cp)
    for method, template, who, extra, field in MASS_ASSIGNMENT:
        body = {**bases.get(template, {}), **extra}
        path = template.format(session=bases["session"])
        response = await cp.call(method, path, tokens[who], json=body)
        problem = await assert_problem(response, 400)
        assert field in [error["field"] for error in problem["errors"]], (template, problem)
    assert state(cp) == before  # nothing was created, changed or revoked
    await assert_up(cp)


# --- body bombs -----------------------------------------------------------------------------------

async def _stream(cp: ControlPlane, headers: dict[str, str], total: int,
                  chunked: bool = False) -> tuple[int, int, float]:
    """POSTs a body of ``total`` zero bytes on a raw connection, 64 KiB at a time, until the
    service answers; returns (status, bytes sent, seconds)."""
    server = cp.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = ["POST /api/v1/projects HTTP/1.1", f"Host: {server.host}", framing,
            "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    started, sent = time.monotonic(), 0
    chunk = b"0" * 65536
    answer = asyncio.create_task(reader.readline())
    try:
        while sent < total and not answer.done():
            writer.write(b"10000\r\n" + chunk + b"\r\n" if chunked else chunk)
            sent += len(chunk)
            # A service that stops reading leaves the drain pending: its answer ends the upload.
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.wait({drain, answer}, return_when=asyncio.FIRST_COMPLETED)
            if drain.done():
                drain.result()  # raises ConnectionError once the service has closed
            else:
                drain.cancel()
    except ConnectionError:
        pass  # the service closed the connection: it has answered or is about to
    status_line = await asyncio.wait_for(answer, 10)
    elapsed = time.monotonic() - started
    writer.close()
    return int(status_line.split()[1]), sent, elapsed


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("authorized", "status"), [(True, 413), (False, 401)])
async def test_a_100_mib_body_is_refused_without_being_read(cp: ControlPlane, chunked: bool,
                                                            authorized: bool, status: int) -> None:
    headers = {"Authorization": f"Bearer {cp.admin_token}"} if authorized else {}
    answered, sent, elapsed = await _stream(cp, headers, 100 * MIB, chunked)
    assert answered == status
    assert sent < 16 * MIB and elapsed < 5, (sent, elapsed)  # refused early, not buffered
    assert sql(cp.database, "SELECT name FROM projects ORDER BY name") == [("alpha",), ("beta",)]
    await assert_up(cp)


@pytest.mark.parametrize(("body", "status"), [
    (b"[" * 100_000 + b"]" * 100_000, 413),  # 10^5 levels: beyond the size limit
    (b"[" * 30_000 + b"]" * 30_000, 400),  # within it: the parser's depth limit answers
    (b'{"name": ' * 6_000 + b"1" + b"}" * 6_000, 400),  # nested objects
    (b'{"name": "x", "quotas": {"tokens": ' + b"9" * 20_000 + b"}}", 400),
    (b'{"name": "x", "quotas": {"tokens": 1e400}}', 400),
    (b'{"name": "x", "quotas": {"tokens": -0.0}}', 400),
    (b'{"name": "\xff\xfe"}', 400),  # not UTF-8
    (b'{"name": "\\ud800"}', 400),  # a lone surrogate
    (b"null", 400), (b"[]", 400), (b'"alpha"', 400), (b"", 400),
])
async def test_hostile_json_is_a_4xx_not_a_crash(cp: ControlPlane, body: bytes,
                                                 status: int) -> None:
    response = await cp.admin("POST", "/api/v1/projects", data=body, headers=JSON)
    await assert_problem(response, status)
    await assert_up(cp)


async def test_repeated_json_keys_are_refused_naming_the_key(cp: ControlPlane) -> None:
    """Parsers disagree on which of repeated keys counts (a proxy may keep the first, the service
    the last), so a body naming a key twice is refused whichever value is valid."""
    for body in (b'{"name": "fine", "name": "Not Valid!"}', b'{"name": "x!", "name": "last"}',
                 b'{"name": "same", "name": "same"}'):
        response = await cp.admin("POST", "/api/v1/projects", data=body, headers=JSON)
        problem = await assert_problem(response, 400)
        assert problem["errors"] == [{"field": "name", "message": "repeated"}]
    assert [name for (name,) in sql(cp.database, "SELECT name FROM projects")] == [
        "alpha", "beta"]


# --- header bombs and content types ---------------------------------------------------------------

def _many_headers() -> Iterator[tuple[str, dict[str, str]]]:
    yield "10,000 headers", {f"X-Bomb-{n}": "v" for n in range(10_000)}
    yield "a 100 KiB header", {"X-Bomb": "v" * 100 * 1024}
    yield "a 100 KiB cookie", {"Cookie": "c=" + "v" * 100 * 1024}


@pytest.mark.parametrize(("name", "headers"), list(_many_headers()),
                         ids=[name for name, _ in _many_headers()])
async def test_header_bombs_are_refused_and_the_service_stays_up(cp: ControlPlane, name: str,
                                                                 headers: dict[str, str]) -> None:
    status = await http_layer_refusal(cp.admin("GET", "/api/v1/projects", headers=headers))
    assert status in (None, *HTTP_LAYER_REFUSALS), (name, status)
    await assert_up(cp)


async def test_a_100_kib_url_is_refused(cp: ControlPlane) -> None:
    status = await http_layer_refusal(cp.admin("GET", "/api/v1/projects/" + "a" * 100 * 1024))
    assert status in (None, *HTTP_LAYER_REFUSALS)
    await assert_up(cp)


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
    "application/octet-stream", "text/json",
])
async def test_a_body_that_is_not_json_is_415(cp: ControlPlane, content_type: str) -> None:
    response = await cp.admin("POST", "/api/v1/projects", data=b'{"name": "gamma"}',
                              headers={"Content-Type": content_type})
    await assert_problem(response, 415)
    assert (await cp.admin("POST", "/api/v1/projects", data=b'{"name": "gamma"}',
                           headers={"Content-Type": "application/json; charset=utf-8"})
            ).status == 201  # the same body as JSON is fine


async def _announce(cp: ControlPlane, length: int, body: bytes) -> tuple[int, float]:
    """A POST announcing ``length`` bytes of body and sending ``body``, then nothing; the status
    the service answers with and how long it took."""
    server = cp.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = ["POST /api/v1/projects HTTP/1.1", f"Host: {server.host}", f"Content-Length: {length}",
            "Content-Type: application/json", f"Authorization: Bearer {cp.admin_token}"]
    started = time.monotonic()
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    status_line = await asyncio.wait_for(reader.readline(), 20)
    writer.close()
    return int(status_line.split()[1]), time.monotonic() - started


async def test_a_body_announced_too_large_is_413_at_once_from_the_header(cp: ControlPlane) -> None:
    status, elapsed = await _announce(cp, 100 * MIB, b'{"name": "x"}')
    assert (status, elapsed < 2) == (413, True), elapsed
    await assert_up(cp)


async def test_a_body_that_does_not_arrive_in_time_is_408(aiohttp_client: ClientFactory,
                                                          tmp_path: Path) -> None:
    slow = await start_control_plane(aiohttp_client, tmp_path, body_timeout_s=1.0)
    status, elapsed = await _announce(slow, 100, b'{"name": ')
    assert status == 408 and 1.0 <= elapsed < 5, (status, elapsed)
    await assert_up(slow)


async def test_two_authorization_headers_are_refused(cp: ControlPlane) -> None:
    response = await cp.client.get("/api/v1/projects", headers=[
        ("Authorization", f"Bearer {cp.admin_token}"), ("Authorization", "Bearer x.y.z")])
    problem = await assert_problem(response, 401)
    assert "more than one Authorization header" in problem["detail"]
