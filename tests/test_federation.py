"""Federated login end to end: a real OpenID Connect provider (Glewlwyd, its own process on
loopback) issues ID tokens; the control plane verifies them against the provider's JWKS over HTTP,
maps them by the policy's federation rules and issues project tokens, over real HTTP and through
``dsn login``. Refusals, the key cache's bounds and the issuer's key rotation are covered too.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cp_helpers import (
    DSN,
    SHIPPED_POLICY,
    ClientFactory,
    ControlPlane,
    ManualClock,
    served_on,
    start_control_plane,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from oidc_provider import CLIENT_ID, Glewlwyd, rsa_jwk, unavailable

from controlplane.policy import lint

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

TOKEN = "/api/v1/token"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
PROJECT = "urn:dsn:params:token-type:project"
STAFF_SCOPES = ["token:exchange", "projects:read", "tokens:read", "sessions:read",
                "sessions:write"]


@pytest.fixture
def idp(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[Glewlwyd]:
    provider = Glewlwyd(tmp_path / "idp", free_port())
    provider.start()
    provider.add_user("alice", "alice@ncem.example")
    provider.add_user("mallory", "mallory@elsewhere.example")
    try:
        yield provider
    finally:
        provider.stop()


def federation(idp: Glewlwyd, **overrides: Any) -> dict[str, Any]:
    trusted = {"name": "facility", "issuer": idp.issuer, "audience": CLIENT_ID,
               "jwks_url": idp.jwks_url, "algorithms": ["RS256"], "max_age": 300,
               "stale_for": 600, "refetch_interval": 30,
               "rules": [{"id": "ncem-staff", "email": "*@ncem.example", "project": "ncem-4d",
                          "scopes": STAFF_SCOPES}]}
    trusted.update(overrides)
    return {"max_ttl": "8h", "issuers": [trusted]}


def policy_file(directory: Path, section: dict[str, Any]) -> Path:
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    document["federation"] = section
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def control_plane(aiohttp_client: ClientFactory, tmp_path: Path, section: dict[str, Any],
                        quotas: dict[str, int] | None = None, **kwargs: Any) -> ControlPlane:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state",
                                   policy_path=policy_file(tmp_path / "policy", section), **kwargs)
    await cp.create_project("ncem-4d", quotas=quotas or {})
    return cp


def login_form(id_token: str, **fields: str) -> dict[str, str]:
    return {"grant_type": EXCHANGE, "subject_token": id_token, "subject_token_type": ID_TOKEN,
            "requested_token_type": PROJECT, **fields}


async def login(cp: ControlPlane, id_token: str, **fields: str) -> Any:
    return await cp.client.post(TOKEN, data=login_form(id_token, **fields))


async def refused(response: Any, status: int = 400) -> dict[str, str]:
    assert response.status == status, await response.text()
    body = dict(await response.json())
    assert set(body) == {"error", "error_description"}
    assert response.headers["Cache-Control"] == "no-store"
    return body


def exchanges(cp: ControlPlane) -> list[tuple[Any, ...]]:
    """(principal, action, resource, decision, rule) of the token endpoint's records."""
    return [row[1:6] for row in cp.audit_rows() if row[2].startswith("token:")]


async def test_a_facility_identity_obtains_a_project_token_without_an_admin(
        aiohttp_client: ClientFactory, tmp_path: Path, idp: Glewlwyd) -> None:
    cp = await control_plane(aiohttp_client, tmp_path, federation(idp))
    id_token = idp.id_token("alice")
    subject = jwt.decode(id_token, options={"verify_signature": False})["sub"]
    response = await login(cp, id_token)
    assert response.status == 200, await response.text()
    issued = await response.json()
    assert issued["issued_token_type"] == PROJECT and issued["project"] == "ncem-4d"
    assert set(issued["scope"].split()) == set(STAFF_SCOPES)
    assert 0 < issued["expires_in"] <= 8 * 3600

    # The project token works as any other: it reads its project and exchanges for a session.
    project_token = issued["access_token"]
    assert (await cp.call("GET", "/api/v1/projects/ncem-4d", project_token)).status == 200
    session = await cp.exchange(project_token, kind="session")
    assert session["subject"] == f"facility:{subject}" and session["project"] == "ncem-4d"
    listed = await (await cp.admin("GET", "/api/v1/projects/ncem-4d/tokens")).json()
    assert {t["subject"] for t in listed["items"]} == {f"facility:{subject}"}

    principal = f"federated:facility:{subject}@ncem-4d#rule:ncem-staff"
    assert (principal, "token:federate", "token/ncem-4d", "allow",
            "federated-identities-sign-in") in exchanges(cp)
    assert all(id_token not in str(row) for row in cp.audit_rows())


async def test_federated_tokens_count_against_the_projects_token_quota(
        aiohttp_client: ClientFactory, tmp_path: Path, idp: Glewlwyd) -> None:
    cp = await control_plane(aiohttp_client, tmp_path, federation(idp), quotas={"tokens": 1})
    assert (await login(cp, idp.id_token("alice"))).status == 200
    body = await refused(await login(cp, idp.id_token("alice")))
    assert body["error"] == "invalid_request" and "quota" in body["error_description"]


async def test_an_identity_no_rule_maps_is_refused_and_audited_by_name(
        aiohttp_client: ClientFactory, tmp_path: Path, idp: Glewlwyd) -> None:
    cp = await control_plane(aiohttp_client, tmp_path, federation(idp))
    id_token = idp.id_token("mallory")
    subject = jwt.decode(id_token, options={"verify_signature": False})["sub"]
    body = await refused(await login(cp, id_token))
    assert "no rule" in body["error_description"]
    assert exchanges(cp)[-1] == (f"federated:facility:{subject}", "token:federate", "token",
                                 "deny", "federation:no-matching-rule")
    # Naming a project no rule maps alice to is refused the same way.
    await refused(await login(cp, idp.id_token("alice"), project="other"))


def forged(header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers=header)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("case", ["issuer", "audience", "expired", "unknown_key", "hs256",
                                  "none", "embedded_jwk", "tampered"])
async def test_bad_identity_tokens_are_refused_with_a_reason_and_audited(
        aiohttp_client: ClientFactory, tmp_path: Path, idp: Glewlwyd, case: str) -> None:
    clock = ManualClock()
    section = federation(idp)
    if case == "issuer":
        section = federation(idp, issuer=idp.issuer + "-other")
    if case == "audience":
        section = federation(idp, audience="another-client")
    cp = await control_plane(aiohttp_client, tmp_path, section, clock=clock)
    id_token = idp.id_token("alice")
    claims = jwt.decode(id_token, options={"verify_signature": False})
    jwk, private = rsa_jwk("k-unknown")
    # The provider's public key as PEM: what an HMAC-confused verifier would use as the secret.
    public_pem = jwt.PyJWK(idp.jwks[0]).key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header, payload, signature = id_token.split(".")
    tokens = {
        "issuer": id_token, "audience": id_token, "expired": id_token,
        "unknown_key": forged({"kid": "k-unknown"}, claims, private),
        "hs256": b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode()) + "."
        + payload + "." + b64(hmac.new(public_pem, f"x.{payload}".encode(),
                                       "sha256").digest()),
        "none": b64(json.dumps({"alg": "none", "kid": "k1"}).encode()) + "." + payload + ".",
        "embedded_jwk": forged({"kid": "k1", "jwk": {k: v for k, v in jwk.items()
                                                     if k in ("kty", "n", "e")}}, claims, private),
        "tampered": header + "." + b64(json.dumps({**claims, "email": "root@ncem.example"})
                                       .encode()) + "." + signature,
    }
    reasons = {"issuer": "issuer", "audience": "audience", "expired": "expired",
               "unknown_key": "unknown_key", "hs256": "algorithm", "none": "algorithm",
               "embedded_jwk": "header", "tampered": "signature"}
    if case == "expired":
        clock.advance(2 * 3600)
    body = await refused(await login(cp, tokens[case]))
    assert body["error"] == "invalid_request" and body["error_description"]
    assert exchanges(cp)[-1] == ("anonymous@127.0.0.1", "token:exchange", "token", "deny",
                                 f"token:{reasons[case]}")


async def test_jwks_outage_uses_stale_keys_within_the_bound_and_fails_closed_beyond(
        aiohttp_client: ClientFactory, tmp_path: Path, idp: Glewlwyd) -> None:
    clock = ManualClock()
    cp = await control_plane(aiohttp_client, tmp_path, federation(idp), clock=clock)
    ids = [idp.id_token("alice") for _ in range(3)]
    assert (await login(cp, ids[0])).status == 200  # the keys are fetched and cached
    idp.stop()
    clock.advance(300 + 300)  # past max_age, within stale_for: the held keys still serve
    assert (await login(cp, ids[1])).status == 200
    clock.advance(301)  # beyond max_age + stale_for: nothing is trusted any more
    body = await refused(await login(cp, ids[2]), 503)
    assert body["error"] == "temporarily_unavailable"
    assert exchanges(cp)[-1][3:] == ("deny", "token:issuer_keys")


async def test_no_keys_ever_fetched_fails_closed(aiohttp_client: ClientFactory, tmp_path: Path,
                                                 idp: Glewlwyd, free_port: Callable[[], int]
                                                 ) -> None:
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    cp = await control_plane(aiohttp_client, tmp_path, federation(idp, jwks_url=dead))
    body = await refused(await login(cp, idp.id_token("alice")), 503)
    assert "keys" in body["error_description"]


async def test_key_rotation_at_the_issuer_is_picked_up(
        aiohttp_client: ClientFactory, tmp_path: Path, idp: Glewlwyd) -> None:
    clock = ManualClock()
    cp = await control_plane(aiohttp_client, tmp_path, federation(idp), clock=clock)
    assert (await login(cp, idp.id_token("alice"))).status == 200
    idp.rotate_key("k2")
    rotated = idp.id_token("alice")
    assert jwt.get_unverified_header(rotated)["kid"] == "k2"
    # Right after a fetch an unknown kid does not send us to the issuer again (the rate bound)...
    await refused(await login(cp, rotated))
    clock.advance(31)  # ...but once the refetch interval has passed, the new key is fetched.
    assert (await login(cp, rotated)).status == 200


async def test_dsn_login_writes_a_project_token_file(tmp_path: Path, idp: Glewlwyd,
                                                    free_port: Callable[[], int]) -> None:
    port = free_port()
    async with served_on(port) as serve:
        cp = await control_plane(serve, tmp_path, federation(idp), port=port)
        id_file = tmp_path / "id.token"
        id_file.write_text(idp.id_token("alice") + "\n")
        id_file.chmod(0o600)
        out = tmp_path / "ncem.token"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DSN_")}
        url = cp.settings.base_url
        down = f"http://127.0.0.1:{free_port()}"  # a replica that is down, tried first
        # In a thread: this loop must go on serving the control plane the command calls.
        done = await asyncio.to_thread(
            subprocess.run, [DSN, "login", "--controlplane", f"{down},{url}", "--id-token-file",
                             str(id_file), "--out", str(out)],
            capture_output=True, text=True, env=environment, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "project=ncem-4d" in done.stdout and str(out) in done.stdout
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        token = out.read_text().strip()
        assert token not in done.stdout + done.stderr
        assert (await cp.call("GET", "/api/v1/projects/ncem-4d", token)).status == 200

        # From the environment too; and a refused identity is one error line, exit 1.
        again = await asyncio.to_thread(
            subprocess.run, [DSN, "login", "--controlplane", url, "--out",
                             str(tmp_path / "mallory.token")], capture_output=True, text=True,
            timeout=60,
                               env={**environment, "DSN_ID_TOKEN": idp.id_token("mallory")})
        assert again.returncode == 1
        assert again.stderr.startswith("error: login refused: 400 invalid_request: no rule")
        assert len(again.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "mallory.token").exists()


@pytest.mark.parametrize(("change", "problem"), [
    ({"algorithms": ["HS256"]}, "algorithms"),
    ({"algorithms": ["none"]}, "algorithms"),
    ({"jwks_url": "http://idp.facility.example/jwks"}, "https"),
    ({"rules": [{"id": "everyone", "project": "p", "scopes": ["sessions:read"]}]},
     "condition"),
    ({"rules": [{"id": "too-wide", "email": "*@x", "project": "p", "scopes": ["keys:write"]}]},
     "beyond what project tokens may carry"),
    ({"leeway": 3600}, "leeway"),
])
def test_the_federation_section_is_linted(tmp_path: Path, idp: Glewlwyd, change: dict[str, Any],
                                          problem: str) -> None:
    problems = lint(policy_file(tmp_path, federation(idp, **change)))
    assert any(problem in line for line in problems), problems


def test_the_shipped_policy_and_a_federation_section_lint_clean(tmp_path: Path,
                                                                 idp: Glewlwyd) -> None:
    assert lint(SHIPPED_POLICY) == []
    assert lint(policy_file(tmp_path, federation(idp))) == []
