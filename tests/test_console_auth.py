"""The console's sign-in over real HTTP: a token presented once becomes an HttpOnly, SameSite
session cookie bound to a server-side session, which then acts as the token on the REST API (same
policy, same audit, named 'via console'), refuses state changes without its CSRF token or from
another origin, dies with its token's revocation, and ends at sign-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane, sql, start_control_plane

from controlplane.console.auth import COOKIE, CSRF_HEADER
from controlplane.console.web import CONTENT_SECURITY_POLICY


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await start_control_plane(aiohttp_client, tmp_path / "state")


async def sign_in(cp: ControlPlane, token: str) -> dict[str, Any]:
    response = await cp.call("POST", "/ui/session", token)
    assert response.status == 201, await response.text()
    return dict(await response.json())


def cookie_header(response: Any) -> str:
    return str(response.headers["Set-Cookie"])


async def test_sign_in_sets_an_http_only_same_site_cookie_and_never_echoes_the_token(
        cp: ControlPlane) -> None:
    response = await cp.call("POST", "/ui/session", cp.admin_token)
    assert response.status == 201
    header = cookie_header(response)
    assert header.startswith(f"{COOKIE}=")
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
    assert "Secure" not in header  # plain HTTP on loopback: a Secure cookie would never return
    body = await response.text()
    assert cp.admin_token not in body and cp.admin_token not in header
    assert response.headers["Cache-Control"] == "no-store"
    # Server-side: the session row holds claims and the secret's hash, never the token or secret.
    secret = response.cookies[COOKIE].value
    (stored,) = sql(cp.database, "SELECT id, claims FROM console_sessions")
    assert secret not in stored[0] and cp.admin_token not in stored[1]


async def test_behind_tls_the_cookie_is_secure_and_host_prefixed(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state",
                                   public_url="https://dsn.example.org")
    response = await cp.call("POST", "/ui/session", cp.admin_token)
    header = cookie_header(response)
    assert header.startswith("__Host-dsn_console=") and "Secure" in header


async def test_the_cookie_acts_as_the_token_and_the_audit_says_so(cp: ControlPlane) -> None:
    await sign_in(cp, cp.admin_token)
    response = await cp.call("GET", "/api/v1/projects")  # no Authorization: the cookie
    assert response.status == 200
    principal = cp.audit_rows()[-1][1]
    assert principal.startswith("admin:alice#") or principal.startswith("admin:")
    assert principal.endswith(" via console")


async def test_a_state_change_needs_the_csrf_token(cp: ControlPlane) -> None:
    session = await sign_in(cp, cp.admin_token)
    refused = await cp.call("POST", "/api/v1/projects", json={"name": "forged"})
    assert refused.status == 403
    assert CSRF_HEADER in (await refused.json())["detail"]
    wrong = await cp.call("POST", "/api/v1/projects", json={"name": "forged"},
                          headers={CSRF_HEADER: "x" * 43})
    assert wrong.status == 403
    done = await cp.call("POST", "/api/v1/projects", json={"name": "real"},
                         headers={CSRF_HEADER: session["csrf_token"]})
    assert done.status == 201
    listed = await (await cp.admin("GET", "/api/v1/projects")).json()
    assert [p["name"] for p in listed["items"]] == ["real"]  # nothing forged was made
    assert any(row[5] == "csrf" and row[4] == "deny" for row in cp.audit_rows())


async def test_a_state_change_from_another_origin_is_refused_even_with_the_token(
        cp: ControlPlane) -> None:
    session = await sign_in(cp, cp.admin_token)
    refused = await cp.call("POST", "/api/v1/projects", json={"name": "forged"},
                            headers={CSRF_HEADER: session["csrf_token"],
                                     "Origin": "https://evil.example"})
    assert refused.status == 403
    same = await cp.call("POST", "/api/v1/projects", json={"name": "fine"},
                         headers={CSRF_HEADER: session["csrf_token"], "Origin": cp.url})
    assert same.status == 201


async def test_signing_in_from_another_origin_is_refused(cp: ControlPlane) -> None:
    response = await cp.call("POST", "/ui/session", cp.admin_token,
                             headers={"Origin": "https://evil.example"})
    assert response.status == 403
    assert "Set-Cookie" not in response.headers


async def test_revoking_the_token_ends_the_console_session(cp: ControlPlane) -> None:
    await cp.create_project("beam")
    issued = await cp.project_token("beam")
    await sign_in(cp, issued["token"])
    assert (await cp.call("GET", "/api/v1/projects/beam")).status == 200
    revoked = await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")
    assert revoked.status in (200, 204)
    refused = await cp.call("GET", "/api/v1/projects/beam")
    assert refused.status == 401
    assert "revoked" in (await refused.json())["detail"]
    assert (await cp.call("GET", "/ui/session")).status == 401


async def test_a_project_member_sees_only_their_project(cp: ControlPlane) -> None:
    await cp.create_project("beam")
    await cp.create_project("other")
    session = await sign_in(cp, (await cp.project_token("beam"))["token"])
    assert session["kind"] == "project" and session["project"] == "beam"
    assert (await cp.call("GET", "/api/v1/projects/other")).status == 403
    audit = await cp.call("GET", "/api/v1/audit")  # an admin's route: the token kind is refused
    assert audit.status == 401 and "not accepted here" in (await audit.json())["detail"]


async def test_session_and_consumer_tokens_cannot_sign_in(cp: ControlPlane) -> None:
    await cp.create_project("beam")
    project = await cp.project_token("beam")
    session_token = (await cp.exchange(project["token"], kind="session"))
    response = await cp.call("POST", "/ui/session", session_token["token"])
    assert response.status == 401
    assert "Set-Cookie" not in response.headers


async def test_sign_out_ends_the_session_server_side(cp: ControlPlane) -> None:
    session = await sign_in(cp, cp.admin_token)
    stolen = cp.client.session.cookie_jar.filter_cookies(cp.client.make_url("/"))[COOKIE].value
    out = await cp.call("DELETE", "/ui/session", headers={CSRF_HEADER: session["csrf_token"]})
    assert out.status == 204
    assert "Max-Age=0" in cookie_header(out) or "expires" in cookie_header(out).lower()
    # The cookie's value, replayed after sign-out, opens nothing.
    replay = await cp.call("GET", "/api/v1/projects", headers={"Cookie": f"{COOKIE}={stolen}"})
    assert replay.status == 401


async def test_the_session_expires_with_its_token_or_its_lifetime(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", console_session_s=600)
    session = await sign_in(cp, cp.admin_token)
    assert session["expires_at"]
    cp.clock.advance(601)
    assert (await cp.call("GET", "/api/v1/projects")).status == 401


async def test_a_malformed_or_unknown_cookie_is_refused_not_ignored(cp: ControlPlane) -> None:
    for value in ("short", "A" * 43):
        response = await cp.call("GET", "/api/v1/projects", headers={"Cookie": f"{COOKIE}={value}"})
        assert response.status == 401


async def test_every_answer_carries_a_strict_content_security_policy(cp: ControlPlane) -> None:
    for path in ("/ui", "/ui/static/app.js", "/api/v1/projects", "/healthz"):
        response = await cp.call("GET", path)
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Frame-Options"] == "DENY"
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY


async def test_only_shipped_files_are_served(cp: ControlPlane) -> None:
    page = await cp.call("GET", "/ui")
    assert page.status == 200 and page.content_type == "text/html"
    script = await cp.call("GET", "/ui/static/app.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    for name in ("../auth.py", "..%2Fauth.py", "pages/../../auth.py", "nothing.js"):
        assert (await cp.call("GET", f"/ui/static/{name}")).status == 404
