"""The control plane REST API end to end: a real app (aiohttp test server) on real SQLite.

Covers the token attack list, cross-project access (403 everywhere), exchange, revocation, rate
limits, restart persistence, the audit chain (one record per decision, tamper detection, sink
failure -> 503), problem+json hygiene and the public routes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cp_helpers import (
    ClientFactory,
    ControlPlane,
    ManualClock,
    sql,
    start_control_plane,
    write_policy,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import InvalidSetting
from controlplane import errors, paths
from controlplane.middlewares import ROUTE_SPECS, client_address, redact
from controlplane.problems import problem_headers, problem_type
from controlplane.settings import Settings
from controlplane.store import projects as project_repo
from controlplane.store.engine import Store

PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}
DAY = 86400


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await start_control_plane(aiohttp_client, tmp_path / "state")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()),
                     b64(signature)])


async def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body = dict(await response.json())
    assert PROBLEM_KEYS <= set(body) and body["status"] == status
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


# --- the token attack list -----------------------------------------------------------------------

Attack = Callable[[ControlPlane], Awaitable[tuple[str, str]]]


async def alg_none(cp: ControlPlane) -> tuple[str, str]:
    kid = cp.services.keyring.signing_key()[0]
    return unsigned({"alg": "none", "kid": kid, "typ": "JWT"}, cp.claims(), b"x"), "algorithm"


async def alg_none_empty_signature(cp: ControlPlane) -> tuple[str, str]:
    return jwt.encode(cp.claims(), None, algorithm="none"), "malformed"


async def hs256_with_public_key(cp: ControlPlane) -> tuple[str, str]:
    # The classic confusion: HMAC "signed" with the published key, as if it were a shared secret.
    jwk = cp.services.keyring.jwks()["keys"][0]
    public_key = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    header = {"alg": "HS256", "kid": jwk["kid"], "typ": "JWT"}
    signing_input = unsigned(header, cp.claims()).rsplit(".", 1)[0]
    digest = hmac.new(public_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(digest)}", "algorithm"


async def tampered_payload(cp: ControlPlane) -> tuple[str, str]:
    await cp.create_project("alpha")
    token = (await cp.project_token("alpha"))["token"]
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(token_use="admin", project=None)
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}", "signature"


async def unknown_key(cp: ControlPlane) -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    kid = cp.services.keyring.signing_key()[0]
    return jwt.encode(cp.claims(), key, algorithm="EdDSA", headers={"kid": kid}), "signature"


async def expired(cp: ControlPlane) -> tuple[str, str]:
    token = cp.sign(cp.claims(exp=int(cp.clock()) + 60))
    cp.clock.advance(60 + cp.settings.leeway_s + 1)
    return token, "expired"


async def immature(cp: ControlPlane) -> tuple[str, str]:
    now = int(cp.clock())
    return cp.sign(cp.claims(iat=now + 3600, exp=now + 4000)), "immature"


async def wrong_issuer(cp: ControlPlane) -> tuple[str, str]:
    return cp.sign(cp.claims(iss="https://elsewhere.example")), "issuer"


async def wrong_audience(cp: ControlPlane) -> tuple[str, str]:
    await cp.create_project("alpha")
    project_token = (await cp.project_token("alpha"))["token"]
    session = await cp.exchange(project_token, kind="session")  # audience: the gateway
    return session["token"], "audience"


async def wrong_kind(cp: ControlPlane) -> tuple[str, str]:
    await cp.create_project("alpha")
    project_token = (await cp.project_token("alpha"))["token"]
    consumer = await cp.exchange(project_token, kind="consumer")  # this API, but not its routes
    return consumer["token"], "kind"


async def missing_claim(cp: ControlPlane) -> tuple[str, str]:
    claims = cp.claims()
    del claims["jti"]
    return cp.sign(claims), "missing_claim"


async def string_exp(cp: ControlPlane) -> tuple[str, str]:
    return cp.sign(cp.claims(exp=str(int(cp.clock()) + 600))), "invalid_claim"


async def boolean_iat(cp: ControlPlane) -> tuple[str, str]:
    return cp.sign(cp.claims(iat=True)), "invalid_claim"


async def list_scope(cp: ControlPlane) -> tuple[str, str]:
    return cp.sign(cp.claims(scope=["projects:read"])), "invalid_claim"


async def lifetime_beyond_policy(cp: ControlPlane) -> tuple[str, str]:
    now = int(cp.clock())
    return cp.sign(cp.claims(iat=now, exp=now + 365 * DAY)), "lifetime"


async def revoked_jti(cp: ControlPlane) -> tuple[str, str]:
    await cp.create_project("alpha")
    issued = await cp.project_token("alpha")
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).status == 200
    return issued["token"], "revoked"


async def before_project_not_before(cp: ControlPlane) -> tuple[str, str]:
    await cp.create_project("alpha")
    token = (await cp.project_token("alpha"))["token"]
    cp.clock.advance(5)
    response = await cp.admin("PATCH", "/api/v1/projects/alpha",
                              json={"not_before": _iso(cp.clock())})
    assert response.status == 200
    return token, "revoked"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


ATTACKS: dict[str, tuple[Attack, str]] = {
    "alg none": (alg_none, "/api/v1/projects"),
    "alg none, no signature": (alg_none_empty_signature, "/api/v1/projects"),
    "HS256 signed with the public key": (hs256_with_public_key, "/api/v1/projects"),
    "tampered payload": (tampered_payload, "/api/v1/projects"),
    "signed by an unpublished key": (unknown_key, "/api/v1/projects"),
    "expired": (expired, "/api/v1/projects"),
    "immature": (immature, "/api/v1/projects"),
    "wrong issuer": (wrong_issuer, "/api/v1/projects"),
    "wrong audience (session token)": (wrong_audience, "/api/v1/projects/alpha"),
    "wrong kind (consumer token)": (wrong_kind, "/api/v1/projects/alpha"),
    "missing jti": (missing_claim, "/api/v1/projects"),
    "exp as a string": (string_exp, "/api/v1/projects"),
    "iat as a boolean": (boolean_iat, "/api/v1/projects"),
    "scope as a list": (list_scope, "/api/v1/projects"),
    "lifetime beyond the policy cap": (lifetime_beyond_policy, "/api/v1/projects"),
    "revoked jti": (revoked_jti, "/api/v1/projects/alpha"),
    "issued before the project's not_before": (before_project_not_before, "/api/v1/projects/alpha"),
}


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
async def test_token_attack_is_refused_and_audited(cp: ControlPlane, attack: str) -> None:
    build, path = ATTACKS[attack]
    token, reason = await build(cp)
    response = await cp.call("GET", path, token)
    body = await assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert token not in json.dumps(body)
    last = cp.audit_rows()[-1]
    assert last[1:] == ("anonymous@127.0.0.1",
                        "projects:" + ("read" if path.endswith("alpha") else "list"),
                        "project/alpha/alpha" if path.endswith("alpha") else "project", "deny",
                        f"token:{reason}", body["request_id"])


async def test_forged_claims_helper_makes_a_valid_token(cp: ControlPlane) -> None:
    """The attack tests change one thing each: unchanged, the same claims are accepted."""
    assert (await cp.call("GET", "/api/v1/projects", cp.sign(cp.claims()))).status == 200


async def test_missing_or_malformed_authorization(cp: ControlPlane) -> None:
    await assert_problem(await cp.client.get("/api/v1/projects"), 401)
    assert cp.audit_rows()[-1][5] == "token:missing"
    await assert_problem(await cp.client.get(
        "/api/v1/projects", headers={"Authorization": f"Basic {cp.admin_token}"}), 401)
    # The same source's next refusal in the window is summed up when the window ends.
    cp.clock.advance(cp.settings.audit_denial_window_s)
    assert await cp.services.audit.flush_denials() == 1
    assert sql(cp.database, "SELECT principal, rule, count FROM audit ORDER BY seq DESC "
                            "LIMIT 1") == [("anonymous@127.0.0.1", "token:malformed", 1)]


@pytest.mark.parametrize(("leeway", "status"), [(30, 200), (0, 401)])
async def test_leeway_is_configurable(aiohttp_client: ClientFactory, tmp_path: Path, leeway: int,
                                      status: int) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", leeway_s=leeway)
    token = cp.sign(cp.claims(exp=int(cp.clock()) + 60))
    cp.clock.advance(70)  # expired ten seconds ago
    assert (await cp.call("GET", "/api/v1/projects", token)).status == status


# --- cross-project access: 403 everywhere, existing or not -------------------------------------

PROJECT_ROUTES = [("GET", "/api/v1/projects/{p}", None),
                  ("PATCH", "/api/v1/projects/{p}", {"quotas": {"tokens": 1000}}),
                  ("GET", "/api/v1/projects/{p}/tokens", None),
                  ("POST", "/api/v1/projects/{p}/tokens",
                   {"subject": "x", "scope": "projects:read", "ttl": 60})]


@pytest.mark.parametrize(("method", "template", "body"), PROJECT_ROUTES)
@pytest.mark.parametrize("other", ["beta", "ghost"])
async def test_cross_project_access_is_403(cp: ControlPlane, method: str, template: str,
                                           body: Any, other: str) -> None:
    await cp.create_project("alpha")
    await cp.create_project("beta")
    token = (await cp.project_token("alpha"))["token"]
    response = await cp.call(method, template.format(p=other), token, json=body)
    problem = await assert_problem(response, 403)
    assert "beta" not in problem["detail"] and "ghost" not in problem["detail"]
    assert cp.audit_rows()[-1][4:6] == ("deny", "cross-project")


async def test_project_token_reads_its_own_project_but_cannot_administer_it(
        cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    token = (await cp.project_token("alpha"))["token"]
    assert (await cp.call("GET", "/api/v1/projects/alpha", token)).status == 200
    assert (await cp.call("GET", "/api/v1/projects/alpha/tokens", token)).status == 200
    response = await cp.call("PATCH", "/api/v1/projects/alpha", token, json={"quotas": {}})
    await assert_problem(response, 403)
    assert cp.audit_rows()[-1][4:6] == ("deny", "missing-scope")  # it holds no projects:write


async def test_admin_sees_404_for_a_missing_project(cp: ControlPlane) -> None:
    for method, template, body in PROJECT_ROUTES:
        await assert_problem(await cp.admin(method, template.format(p="ghost"), json=body), 404)


# --- projects, tokens, exchange ------------------------------------------------------------------

async def test_project_crud(cp: ControlPlane) -> None:
    created = await cp.create_project("alpha", allowed_templates=["4dcamera"], quotas={"tokens": 5})
    assert created["quotas"] == {"tokens": 5} and created["not_before"] is None
    await assert_problem(await cp.admin("POST", "/api/v1/projects", json={"name": "alpha"}), 409)
    listed = await (await cp.admin("GET", "/api/v1/projects")).json()
    assert [p["name"] for p in listed["items"]] == ["alpha"]
    patched = await (await cp.admin("PATCH", "/api/v1/projects/alpha",
                                    json={"allowed_templates": []})).json()
    assert patched["allowed_templates"] == [] and patched["quotas"] == {"tokens": 5}


async def test_not_before_only_moves_forward(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    now = cp.clock()
    assert (await cp.admin("PATCH", "/api/v1/projects/alpha",
                           json={"not_before": _iso(now)})).status == 200
    body = await assert_problem(await cp.admin("PATCH", "/api/v1/projects/alpha",
                                               json={"not_before": _iso(now - 3600)}), 400)
    assert body["errors"][0]["field"] == "not_before"
    await assert_problem(await cp.admin("PATCH", "/api/v1/projects/alpha",
                                        json={"not_before": _iso(now + DAY)}), 400)


async def test_new_tokens_work_after_not_before(aiohttp_client: ClientFactory,
                                                tmp_path: Path) -> None:
    clock = ManualClock(1_800_000_000.5)
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", clock=clock)
    await cp.create_project("alpha")
    await cp.admin("PATCH", "/api/v1/projects/alpha", json={"not_before": _iso(clock())})
    # A token issued in the cut-off's own second would die at once (iat is whole seconds): 409.
    body = {"subject": "a", "scope": "projects:read", "ttl": 60}
    refused = await cp.admin("POST", "/api/v1/projects/alpha/tokens", json=body)
    await assert_problem(refused, 409)
    assert refused.headers["Retry-After"] == "1"
    clock.advance(1)
    token = (await cp.project_token("alpha"))["token"]
    assert (await cp.call("GET", "/api/v1/projects/alpha", token)).status == 200


async def test_issued_token_is_shown_once_and_listed_without_secrets(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    issued = await cp.project_token("alpha", ttl=600)
    assert issued["kind"] == "project" and issued["expires_in"] == 600
    listed = await (await cp.admin("GET", "/api/v1/projects/alpha/tokens")).json()
    assert [t["jti"] for t in listed["items"]] == [issued["jti"]]
    assert issued["token"] not in json.dumps(listed) and "token" not in listed["items"][0]
    stored = json.dumps(sql(cp.database, "SELECT * FROM tokens"))
    assert issued["token"] not in stored and issued["token"].split(".")[2] not in stored


async def test_token_scope_and_ttl_default_to_the_policy(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    response = await cp.admin("POST", "/api/v1/projects/alpha/tokens", json={"subject": "a"})
    issued = await response.json()
    assert response.status == 201
    assert issued["expires_in"] == 90 * DAY
    assert set(issued["scope"].split()) == {
        "projects:read", "scans:read", "sessions:read", "sessions:write", "templates:read",
        "templates:render", "token:exchange", "tokens:read", "consumers:register", "scans:report"}


async def test_token_ttl_beyond_policy_is_refused(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    response = await cp.admin("POST", "/api/v1/projects/alpha/tokens",
                              json={"subject": "a", "scope": "projects:read", "ttl": 91 * DAY})
    await assert_problem(response, 400)


async def test_token_scope_beyond_policy_roles_is_refused(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    response = await cp.admin("POST", "/api/v1/projects/alpha/tokens",
                              json={"subject": "a", "scope": "keys:write", "ttl": 60})
    body = await assert_problem(response, 400)
    assert body["errors"][0]["field"] == "scope"


async def test_token_quota(cp: ControlPlane) -> None:
    await cp.create_project("alpha", quotas={"tokens": 1})
    await cp.project_token("alpha")
    response = await cp.admin("POST", "/api/v1/projects/alpha/tokens",
                              json={"subject": "b", "scope": "projects:read", "ttl": 60})
    await assert_problem(response, 409)


async def test_exchanged_tokens_count_against_the_projects_token_quota(cp: ControlPlane) -> None:
    await cp.create_project("alpha", quotas={"tokens": 3})
    parent = await cp.project_token("alpha")
    await cp.exchange(parent["token"], kind="consumer")
    await cp.exchange(parent["token"], kind="session")
    response = await cp.call("POST", "/api/v1/token", parent["token"], json={"kind": "consumer"})
    body = await assert_problem(response, 409)
    assert "quota of 3 live tokens" in body["detail"]


async def test_exchange_narrows_scope_and_caps_lifetime(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha", ttl=7 * DAY)
    session = await cp.exchange(parent["token"], kind="session", scope="sessions:write",
                                ttl=30 * DAY)
    assert session["scope"] == "sessions:write" and session["audience"] == "dsn-gateway"
    assert session["expires_in"] == 12 * 3600  # the policy's session cap, not the 30 days asked
    consumer = await cp.exchange(parent["token"], kind="consumer")
    assert consumer["scope"] == "sessions:read"  # what both the parent and the kind allow
    short = await cp.project_token("alpha", ttl=300)
    assert (await cp.exchange(short["token"], kind="session"))["expires_in"] <= 300
    tokens = await (await cp.admin("GET", "/api/v1/projects/alpha/tokens")).json()
    parents = {t["jti"]: t["parent_jti"] for t in tokens["items"]}
    assert parents[session["jti"]] == parent["jti"]


@pytest.mark.parametrize("body", [{"kind": "session", "scope": "tokens:write"},
                                  {"kind": "session", "scope": "scans:report"},
                                  {"kind": "session", "audience": "https://elsewhere"},
                                  {"kind": "admin"}, {"kind": "session", "ttl": 0}])
async def test_exchange_refuses_wider_or_unknown_terms(cp: ControlPlane,
                                                       body: dict[str, Any]) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    await assert_problem(await cp.call("POST", "/api/v1/token", parent["token"], json=body), 400)


async def test_only_project_tokens_exchange(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    consumer = await cp.exchange((await cp.project_token("alpha"))["token"], kind="consumer")
    for token in (cp.admin_token, consumer["token"]):
        await assert_problem(await cp.call("POST", "/api/v1/token", token,
                                           json={"kind": "session"}), 401)
        assert cp.audit_rows()[-1][5] == "token:kind"


async def test_revocation_is_idempotent_and_immediate(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    issued = await cp.project_token("alpha")
    assert (await cp.call("GET", "/api/v1/projects/alpha", issued["token"])).status == 200
    first = await (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).json()
    cp.clock.advance(10)
    second = await (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).json()
    assert first["revoked_at"] == second["revoked_at"] is not None
    await assert_problem(await cp.call("GET", "/api/v1/projects/alpha", issued["token"]), 401)
    await assert_problem(await cp.admin("DELETE", "/api/v1/tokens/unknown-jti"), 404)


# --- rate limits ---------------------------------------------------------------------------------

async def test_rate_limits_per_token_and_per_project(aiohttp_client: ClientFactory,
                                                     tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy", per_token="3/minute", per_project="5/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    await cp.create_project("alpha")
    first, second = [(await cp.project_token("alpha", subject=s))["token"] for s in "ab"]
    for _ in range(3):
        assert (await cp.call("GET", "/api/v1/projects/alpha", first)).status == 200
    limited = await cp.call("GET", "/api/v1/projects/alpha", first)
    await assert_problem(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert cp.audit_rows()[-1][4:6] == ("deny", "rate-limit")
    # The project has spent 3 of its 5 (the refused request did not count): 2 more, then 429.
    for _ in range(2):
        assert (await cp.call("GET", "/api/v1/projects/alpha", second)).status == 200
    await assert_problem(await cp.call("GET", "/api/v1/projects/alpha", second), 429)
    # Another admin token (no project) is not affected.
    assert (await cp.call("GET", "/api/v1/projects/alpha", cp.sign(cp.claims()))).status == 200


async def test_a_flood_of_bad_tokens_is_rate_limited_per_source_and_audited_in_sum(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy", unauthenticated_per_source="5/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    before = len(cp.audit_rows())
    statuses: Counter[int] = Counter()
    for _ in range(200):
        response = await cp.call("GET", "/api/v1/projects", "x.y.z")
        statuses[response.status] += 1
    assert statuses == {401: 5, 429: 195}
    limited = await cp.call("GET", "/api/v1/projects", "x.y.z")
    assert int(limited.headers["Retry-After"]) >= 1
    # The source's first refusal is on record; the rest wait for the end of the window.
    assert [row[1] for row in cp.audit_rows()[before:]] == ["anonymous@127.0.0.1"]
    # A valid token from the same address is not held back by its neighbours' failures.
    assert (await cp.admin("GET", "/api/v1/projects")).status == 200
    cp.clock.advance(cp.settings.audit_denial_window_s)
    await cp.services.audit.flush_denials()
    summary = sql(cp.database, "SELECT principal, action, decision, rule, count FROM audit "
                               "WHERE count > 1")
    assert summary == [("anonymous@127.0.0.1", "projects:list", "deny", "*", 200)]
    assert (await (await cp.admin("GET", "/api/v1/audit/verify")).json())["ok"] is True


@pytest.mark.parametrize("trusted", [(), ("127.0.0.0/8",)], ids=["direct", "behind-proxy"])
async def test_clients_behind_a_trusted_proxy_are_told_apart_and_no_one_else_picks_an_address(
        aiohttp_client: ClientFactory, tmp_path: Path, trusted: tuple[str, ...]) -> None:
    policy = write_policy(tmp_path / "policy", unauthenticated_per_source="3/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy,
                                   trusted_proxies=trusted, audit_denial_window_s=0)
    statuses: dict[str, list[int]] = {}
    for client in ("203.0.113.7", "198.51.100.9"):
        # The left-most hop is whatever the client wrote; the proxy appended the right-most.
        headers = {"Authorization": "Bearer x.y.z", "X-Forwarded-For": f"10.9.9.9, {client}"}
        statuses[client] = [(await cp.client.get("/api/v1/projects", headers=headers)).status
                            for _ in range(4)]
    principals = [row[1] for row in cp.audit_rows() if row[1].startswith("anonymous@")]
    if trusted:  # each client has its own allowance, and is named in the audit
        assert statuses == {"203.0.113.7": [401, 401, 401, 429],
                            "198.51.100.9": [401, 401, 401, 429]}
        assert set(principals) == {"anonymous@203.0.113.7", "anonymous@198.51.100.9"}
    else:  # the header of a peer that is no trusted proxy is ignored: one address, one allowance
        assert statuses == {"203.0.113.7": [401, 401, 401, 429], "198.51.100.9": [429] * 4}
        assert set(principals) == {"anonymous@127.0.0.1"}


def test_the_client_address_is_the_right_most_hop_no_trusted_proxy_added() -> None:
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("10.0.0.5", ["1.2.3.4, 10.0.0.6"], proxies) == "1.2.3.4"
    assert client_address("10.0.0.5", ["6.6.6.6", "1.2.3.4"], proxies) == "1.2.3.4"
    assert client_address("10.0.0.5", ["not-an-address"], proxies) == "10.0.0.5"
    assert client_address("10.0.0.5", [], proxies) == "10.0.0.5"
    assert client_address("192.0.2.1", ["1.2.3.4"], proxies) == "192.0.2.1"
    assert client_address(None, ["1.2.3.4"], proxies) == "unknown"


def test_a_trusted_proxy_must_be_a_network() -> None:
    with pytest.raises(InvalidSetting, match="trusted_proxies: '10.0.0.0/33'"):
        Settings(state_dir=Path("s"), trusted_proxies=("10.0.0.0/33",))


async def test_refusals_of_a_token_beyond_its_rate_limit_are_audited_in_sum(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy", per_token="2/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    token = (await cp.add_admin("flooder"))["token"]
    for _ in range(50):
        await cp.call("GET", "/api/v1/projects", token)
    rules = [row[5] for row in cp.audit_rows() if row[1].startswith("admin:flooder#")]
    assert rules == ["admins-administer", "admins-administer", "rate-limit"]
    await cp.client.close()  # the service sums up what is pending as it stops
    assert sql(cp.database, "SELECT rule, count FROM audit WHERE principal LIKE 'admin:flooder#%' "
                            "AND count > 1") == [("rate-limit", 47)]


# --- audit ---------------------------------------------------------------------------------------

async def test_each_decision_writes_exactly_one_record(cp: ControlPlane) -> None:
    before = len(cp.audit_rows())
    allowed = await cp.admin("GET", "/api/v1/projects", headers={"X-Request-ID": "req-allow-1"})
    denied = await cp.client.get("/api/v1/projects", headers={"X-Request-ID": "req-deny-1"})
    assert allowed.headers["X-Request-ID"] == "req-allow-1" and denied.status == 401
    for public in ("/healthz", "/readyz", "/.well-known/jwks.json", "/openapi.json", "/metrics"):
        assert (await cp.client.get(public)).status == 200
    rows = cp.audit_rows()[before:]
    assert len(rows) == 2
    assert rows[0][1].startswith("admin:admin#") and rows[0][2:] == (
        "projects:list", "project", "allow", "admins-administer", "req-allow-1")
    assert rows[1][1:] == ("anonymous@127.0.0.1", "projects:list", "project", "deny",
                           "token:missing",
                           "req-deny-1")


async def test_audit_list_pages(cp: ControlPlane) -> None:
    for _ in range(3):
        await cp.admin("GET", "/api/v1/projects")
    page = await (await cp.admin("GET", "/api/v1/audit?after=1&limit=2")).json()
    assert [r["seq"] for r in page["items"]] == [2, 3] and page["next_after"] == 3
    await assert_problem(await cp.admin("GET", "/api/v1/audit?limit=0"), 400)
    await assert_problem(await cp.admin("GET", "/api/v1/audit?colour=red"), 400)


@pytest.mark.parametrize("tamper", [
    "UPDATE audit SET decision = 'allow' WHERE seq = 2",
    "UPDATE audit SET principal = 'admin:someone-else' WHERE seq = 2",
    "DELETE FROM audit WHERE seq = 2",
])
async def test_tampered_audit_record_is_detected(cp: ControlPlane, tamper: str) -> None:
    await cp.client.get("/api/v1/projects")  # seq 2: a deny
    await cp.admin("GET", "/api/v1/projects")  # seq 3
    await cp.admin("GET", "/api/v1/projects")  # seq 4
    clean = await (await cp.admin("GET", "/api/v1/audit/verify")).json()
    assert clean["ok"] is True
    sql(cp.database, tamper)
    result = await (await cp.admin("GET", "/api/v1/audit/verify")).json()
    assert result["ok"] is False and result["first_bad_seq"] in (2, 3) and result["problem"]


async def test_deleted_audit_tail_is_detected(cp: ControlPlane) -> None:
    await cp.admin("GET", "/api/v1/projects")
    sql(cp.database, "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    result = await (await cp.admin("GET", "/api/v1/audit/verify")).json()
    assert result["ok"] is False


async def test_audit_sink_failure_refuses_with_503(cp: ControlPlane) -> None:
    sql(cp.database, "CREATE TRIGGER audit_down BEFORE INSERT ON audit "
                     "BEGIN SELECT RAISE(ABORT, 'audit sink down'); END")
    response = await cp.admin("POST", "/api/v1/projects", json={"name": "alpha"})
    body = await assert_problem(response, 503)
    assert "Retry-After" in response.headers and "audit sink down" not in body["detail"]
    # a deny needs its record too
    await assert_problem(await cp.client.get("/api/v1/projects"), 503)
    sql(cp.database, "DROP TRIGGER audit_down")
    assert sql(cp.database, "SELECT name FROM projects") == []  # nothing was done unaudited
    assert (await (await cp.admin("GET", "/api/v1/audit/verify")).json())["ok"] is True


async def test_store_down_is_503(cp: ControlPlane) -> None:
    await cp.services.store.close()
    await assert_problem(await cp.client.get("/readyz"), 503)
    await assert_problem(await cp.admin("GET", "/api/v1/projects"), 503)


async def test_unknown_action_is_denied_and_audited(cp: ControlPlane) -> None:
    specs = cp.client.app[ROUTE_SPECS]
    route, spec = next((r, s) for r, s in specs.items() if s.action == "projects:list")
    specs[route] = dataclasses.replace(spec, action="projects:launch-missiles")
    await assert_problem(await cp.admin("GET", "/api/v1/projects"), 403)
    assert cp.audit_rows()[-1][2:6] == ("projects:launch-missiles", "project", "deny",
                                        "unknown-action")


# --- restart persistence -------------------------------------------------------------------------

async def test_state_survives_a_restart(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    clock = ManualClock()
    first = await start_control_plane(aiohttp_client, tmp_path / "state", clock=clock)
    await first.create_project("alpha")
    kept = await first.project_token("alpha", subject="kept")
    revoked = await first.project_token("alpha", subject="revoked")
    await first.admin("DELETE", f"/api/v1/tokens/{revoked['jti']}")
    new_kid = (await (await first.admin("POST", "/api/v1/keys/rotate")).json())["kid"]
    jwks_before = await (await first.client.get("/.well-known/jwks.json")).json()
    last_seq = first.audit_rows()[-1][0]
    await first.client.close()

    second = await start_control_plane(aiohttp_client, tmp_path / "state", clock=clock)
    assert await (await second.client.get("/.well-known/jwks.json")).json() == jwks_before
    assert (await second.call("GET", "/api/v1/projects/alpha", kept["token"])).status == 200
    await assert_problem(await second.call("GET", "/api/v1/projects/alpha", revoked["token"]), 401)
    fresh = await second.project_token("alpha", subject="fresh")
    assert jwt.get_unverified_header(fresh["token"])["kid"] == new_kid
    verification = await (await second.admin("GET", "/api/v1/audit/verify")).json()
    assert verification["ok"] is True and verification["records"] > last_seq
    assert [row[0] for row in second.audit_rows()] == list(range(1, verification["records"] + 1))


# --- keys ----------------------------------------------------------------------------------------

async def test_jwks_cache_headers_and_rotation(cp: ControlPlane) -> None:
    first = await cp.client.get("/.well-known/jwks.json")
    assert "max-age=300" in first.headers["Cache-Control"]
    etag = first.headers["ETag"]
    unchanged = await cp.client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert unchanged.status == 304
    old_kid = (await first.json())["keys"][0]["kid"]
    rotated = await (await cp.admin("POST", "/api/v1/keys/rotate")).json()
    assert rotated["published"] == [rotated["kid"], old_kid] and rotated["retired"] == []
    after = await cp.client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert after.status == 200 and after.headers["ETag"] != etag
    assert (await cp.admin("GET", "/api/v1/projects")).status == 200  # old key still verifies
    cp.clock.advance(91 * DAY)  # longer than any token the old key signed can live
    admin = cp.sign(cp.claims(token_use="admin", scope="keys:write"))
    again = await (await cp.call("POST", "/api/v1/keys/rotate", admin)).json()
    assert old_kid in again["retired"] and old_kid not in again["published"]


# --- policies ------------------------------------------------------------------------------------

async def test_policy_reload_keeps_the_last_good_set(aiohttp_client: ClientFactory,
                                                     tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy", per_token="1000/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    policy.write_text(policy.read_text() + "\nsurprise: [\n")
    refused = await (await cp.admin("POST", "/api/v1/policies/reload")).json()
    assert refused["ok"] is False and refused["problems"]
    active = await (await cp.admin("GET", "/api/v1/policies")).json()
    assert active["policy"]["rate_limits"]["per_token"] == "1000/minute"
    write_policy(tmp_path / "policy", per_token="999/minute")
    accepted = await (await cp.admin("POST", "/api/v1/policies/reload")).json()
    # The files by name: where the service keeps them is nobody's business.
    assert accepted == {"ok": True, "problems": [], "sources": [policy.name]}
    active = await (await cp.admin("GET", "/api/v1/policies")).json()
    assert active["policy"]["rate_limits"]["per_token"] == "999/minute"
    assert active["sources"] == [policy.name]


# --- HTTP hygiene --------------------------------------------------------------------------------

async def test_handler_bug_is_a_bare_500(cp: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(store: Store) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(project_repo, "list_projects", broken)
    response = await cp.admin("GET", "/api/v1/projects")
    body = await assert_problem(response, 500)
    assert set(body) == PROBLEM_KEYS and body["detail"] == "Internal error"
    text = await response.text()
    assert "secret" not in text and "Traceback" not in text and "RuntimeError" not in text


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "alpha", "colour": "red"}, "colour"),
    ({"name": "Alpha!"}, "name"),
    ({"name": "alpha", "quotas": {"tokens": "5"}}, "quotas.tokens"),
    ({}, "name"),
])
async def test_invalid_bodies_name_the_field(cp: ControlPlane, body: dict[str, Any],
                                             field: str) -> None:
    problem = await assert_problem(await cp.admin("POST", "/api/v1/projects", json=body), 400)
    assert field in [error["field"] for error in problem["errors"]]


async def test_body_must_be_small_json(cp: ControlPlane) -> None:
    headers = {"Content-Type": "application/json"}
    await assert_problem(await cp.admin("POST", "/api/v1/projects", data=b"{not json",
                                        headers=headers), 400)
    await assert_problem(await cp.admin("POST", "/api/v1/projects", data=b"name=alpha",
                                        headers={"Content-Type": "text/plain"}), 415)
    huge = json.dumps({"name": "alpha", "allowed_templates": ["t"] * 40000}).encode()
    await assert_problem(await cp.admin("POST", "/api/v1/projects", data=huge,
                                        headers=headers), 413)


async def test_unknown_path_and_method_are_problems(cp: ControlPlane) -> None:
    await assert_problem(await cp.client.get("/api/v1/nothing-here"), 404)
    response = await cp.client.put("/api/v1/projects")
    await assert_problem(response, 405)
    assert "GET" in response.headers["Allow"]


async def test_the_server_header_names_no_software_version(cp: ControlPlane) -> None:
    for response in (await cp.client.get("/healthz"), await cp.client.get("/api/v1/nothing-here"),
                     await cp.admin("GET", "/api/v1/projects")):
        assert response.headers["Server"] == "dsn-controlplane"


async def test_a_disk_short_of_space_is_not_ready(aiohttp_client: ClientFactory,
                                                 tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path, min_free_bytes=2**62)
    problem = await assert_problem(await cp.client.get("/readyz"), 503)
    assert "bytes free, fewer than" in problem["detail"]


async def test_health_ready_and_metrics(cp: ControlPlane) -> None:
    assert await (await cp.client.get("/healthz")).json() == {"status": "ok"}
    assert await (await cp.client.get("/readyz")).json() == {"status": "ok"}
    await cp.admin("GET", "/api/v1/projects")
    await cp.client.get("/api/v1/projects")
    text = await (await cp.client.get("/metrics")).text()
    assert ('dsn_cp_http_requests_total{method="GET",route="/api/v1/projects",'
            'status="200"} 1.0') in text
    assert ('dsn_cp_authz_decisions_total{action="projects:list",decision="deny",'
            'reason="token:missing"} 1.0') in text
    assert cp.admin_token not in text


def test_every_error_class_answers_with_the_status_of_its_nearest_listed_class() -> None:
    """The one table from domain errors to HTTP: each class, subclasses included, gets a
    4xx/5xx status, and the token failures all answer 401 with their own stable reasons."""
    def subclasses(cls: type[errors.ControlPlaneError]) -> list[type[errors.ControlPlaneError]]:
        return [cls] + [sub for direct in cls.__subclasses__() for sub in subclasses(direct)]

    for cls in subclasses(errors.ControlPlaneError):
        assert 400 <= problem_type(cls.__new__(cls)).status <= 599, cls
    tokens = subclasses(errors.TokenError)[1:]
    assert {problem_type(cls.__new__(cls)).status for cls in tokens} == {401}
    assert len({cls.reason for cls in tokens}) == len(tokens)
    assert problem_type(errors.UnsupportedMediaType("x")).status == 415  # nearer than 400
    assert problem_headers(errors.Conflict("x", retry_after_s=3)) == {"Retry-After": "3"}


@pytest.mark.parametrize(("name", "value", "valid"), [
    ("jti", "0123456789abcdef0123456789abcdef", True), ("jti", "a.b.c", False),
    ("jti", "x" * 65, False), ("project", "alpha", True), ("project", "Alpha", False),
    ("session", "s-2026.11.22", True), ("scan", "0", True), ("scan", "-1", False),
    ("scan", "9" * 20, False), ("version", "0", False), ("nothing", "x", False),
])
def test_path_parameters_are_checked_against_their_declared_bounds(name: str, value: str,
                                                                    valid: bool) -> None:
    assert paths.valid(name, value) is valid


def test_a_token_shaped_path_segment_is_never_written() -> None:
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJl"
    assert redact(f"/api/v1/tokens/{token}") == "/api/v1/tokens/(redacted)"
    plain = "/api/v1/sessions/s-2026.11.22/scans/3"
    assert redact(plain) == plain
    assert redact("/" + "k" * 65) == "/(redacted)"
