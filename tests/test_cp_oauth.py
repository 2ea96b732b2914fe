"""The token endpoint as RFC 8693 writes it, RFC 6749 errors, and RFC 8414 metadata, over real HTTP
on a real app and SQLite. The JSON form of the exchange stays covered by test_cp_api.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane, start_control_plane, write_policy

from controlplane.tokens import Surface, TokenKind

TOKEN = "/api/v1/token"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SESSION = "urn:dsn:params:token-type:session"
CONSUMER = "urn:dsn:params:token-type:consumer"
OAUTH_ERROR_KEYS = {"error", "error_description"}


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    return await start_control_plane(aiohttp_client, tmp_path / "state")


def form(subject_token: str, **fields: str) -> dict[str, str]:
    return {"grant_type": EXCHANGE, "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN, **fields}


async def post_form(cp: ControlPlane, data: dict[str, str] | str, **kwargs: Any) -> Any:
    return await cp.client.post(TOKEN, data=data, **kwargs)


async def assert_oauth_error(response: Any, error: str, status: int = 400) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = dict(await response.json())
    assert set(body) == OAUTH_ERROR_KEYS and body["error"] == error, body
    return str(body["error_description"])


async def test_form_exchange_answers_as_rfc_8693_writes(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    response = await post_form(cp, form(parent["token"], requested_token_type=SESSION,
                                         scope="sessions:write"))
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert {"access_token", "issued_token_type", "token_type", "expires_in", "scope"} <= set(body)
    assert body["issued_token_type"] == SESSION and body["token_type"] == "Bearer"
    assert body["scope"] == "sessions:write" and 0 < body["expires_in"] <= 12 * 3600
    claims = cp.services.tokens.verify(body["access_token"], Surface(
        cp.settings.gateway_audience, frozenset({TokenKind.SESSION})))
    assert claims.project == "alpha" and claims.sub == "alice" and body["jti"] == claims.jti

    consumer = await (await post_form(cp, form(parent["token"],
                                               requested_token_type=CONSUMER))).json()
    assert consumer["issued_token_type"] == CONSUMER
    assert cp.services.tokens.verify(consumer["access_token"], Surface(
        cp.settings.api_audience, frozenset({TokenKind.CONSUMER}))).kind is TokenKind.CONSUMER


async def test_form_exchange_defaults_to_a_session_token(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    body = await (await post_form(cp, form(parent["token"]))).json()
    assert body["issued_token_type"] == SESSION


@pytest.mark.parametrize(("change", "error"), [
    ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
    ({"grant_type": "authorization_code"}, "unsupported_grant_type"),
    ({"scope": "keys:write"}, "invalid_scope"),
    ({"scope": "sessions:write token:exchange"}, "invalid_scope"),
    ({"audience": "someone-else"}, "invalid_target"),
    ({"resource": "https://elsewhere.example/"}, "invalid_target"),
    ({"requested_token_type": "urn:dsn:params:token-type:admin"}, "invalid_request"),
    ({"requested_token_type": "urn:dsn:params:token-type:project"}, "invalid_request"),
    ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request"),
    ({"actor_token": "x", "actor_token_type": ACCESS_TOKEN}, "invalid_request"),
    ({"subject_token": "not-a-token"}, "invalid_request"),
    ({"unknown_field": "1"}, "invalid_request"),
])
async def test_form_refusals_are_rfc_6749_errors(cp: ControlPlane, change: dict[str, str],
                                                 error: str) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    await assert_oauth_error(await post_form(cp, {**form(parent["token"]), **change}), error)


async def test_form_refuses_a_missing_subject_a_repeated_field_and_a_second_credential(
        cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    token = (await cp.project_token("alpha"))["token"]
    missing = {"grant_type": EXCHANGE, "subject_token_type": ACCESS_TOKEN}
    assert "subject_token" in await assert_oauth_error(await post_form(cp, missing),
                                                       "invalid_request")
    repeated = f"grant_type={EXCHANGE}&subject_token={token}&subject_token={token}" \
               f"&subject_token_type={ACCESS_TOKEN}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert "more than once" in await assert_oauth_error(
        await post_form(cp, repeated, headers=headers), "invalid_request")
    both = await post_form(cp, form(token), headers={"Authorization": f"Bearer {token}"})
    assert "Authorization" in await assert_oauth_error(both, "invalid_request")
    garbage = await post_form(cp, "%zz=%ff&&=", headers=headers)
    await assert_oauth_error(garbage, "invalid_request")


async def test_form_subject_token_is_verified_like_a_bearer_token(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    revoked = await cp.project_token("alpha", subject="bob")
    await cp.admin("DELETE", f"/api/v1/tokens/{revoked['jti']}")
    session = await cp.exchange(parent["token"], kind="session")
    for token in (revoked["token"], session["token"], cp.admin_token):
        await assert_oauth_error(await post_form(cp, form(token)), "invalid_request")


async def test_form_exchange_is_audited_and_counts_against_the_token_quota(
        cp: ControlPlane) -> None:
    await cp.create_project("alpha", quotas={"tokens": 2})
    parent = await cp.project_token("alpha")
    assert (await post_form(cp, form(parent["token"]))).status == 200
    refused = await post_form(cp, form(parent["token"]))
    assert "quota" in await assert_oauth_error(refused, "invalid_request")
    await assert_oauth_error(await post_form(cp, form(parent["token"] + "x")), "invalid_request")
    exchanges = [row for row in cp.audit_rows() if row[2] == "token:exchange"]
    assert [(row[4], row[5]) for row in exchanges[:2]] == [
        ("allow", "clients-work-in-their-project")] * 2
    assert exchanges[2][1] == "anonymous@127.0.0.1" and exchanges[2][4] == "deny"
    assert exchanges[2][5].startswith("token:") and len(exchanges) == 3
    assert exchanges[0][1].startswith(f"project:alice@alpha#{parent['jti']}")
    assert all(parent["token"] not in str(row) for row in cp.audit_rows())


async def test_a_bad_form_is_audited_as_an_anonymous_denial(cp: ControlPlane) -> None:
    await assert_oauth_error(await post_form(cp, {"grant_type": "password"}), "invalid_request")
    assert [row[1:6] for row in cp.audit_rows() if row[2] == "token:exchange"] == [
        ("anonymous@127.0.0.1", "token:exchange", "token", "deny", "request:invalid")]


async def test_an_oversized_form_is_413_as_an_oauth_error(cp: ControlPlane) -> None:
    response = await post_form(cp, form("x" * (cp.settings.client_max_size + 1)))
    description = await assert_oauth_error(response, "invalid_request", 413)
    assert str(cp.settings.client_max_size) in description


async def test_form_rate_limit_is_429_with_retry_after(aiohttp_client: ClientFactory,
                                                       tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy", per_token="2/minute")
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy)
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    for _ in range(2):
        assert (await post_form(cp, form(parent["token"]))).status == 200
    refused = await post_form(cp, form(parent["token"]))
    await assert_oauth_error(refused, "temporarily_unavailable", 429)
    assert int(refused.headers["Retry-After"]) >= 1


async def test_json_form_still_answers_problem_json(cp: ControlPlane) -> None:
    await cp.create_project("alpha")
    parent = await cp.project_token("alpha")
    issued = await cp.exchange(parent["token"], kind="consumer")
    assert issued["kind"] == "consumer" and issued["token_type"] == "Bearer"
    wide = await cp.call("POST", TOKEN, parent["token"], json={"kind": "session",
                                                               "scope": "keys:write"})
    assert wide.status == 400 and wide.content_type == "application/problem+json"


async def test_rfc_8414_metadata_names_the_public_url_and_the_token_issuer(
        aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state",
                                   public_url="https://dsn.facility.example/")
    response = await cp.client.get("/.well-known/oauth-authorization-server")
    assert response.status == 200 and "max-age" in response.headers["Cache-Control"]
    metadata = await response.json()
    assert metadata["issuer"] == "https://dsn.facility.example"
    assert metadata["token_endpoint"] == "https://dsn.facility.example/api/v1/token"
    assert metadata["jwks_uri"] == "https://dsn.facility.example/.well-known/jwks.json"
    assert metadata["grant_types_supported"] == [EXCHANGE]
    assert metadata["token_endpoint_auth_methods_supported"] == ["none"]
    assert {"sessions:write", "token:exchange"} <= set(metadata["scopes_supported"])
    assert metadata["dsn_token_issuer"] == "dsn-controlplane"
    assert SESSION in metadata["dsn_requested_token_types_supported"]


async def test_metadata_defaults_to_the_listening_url(cp: ControlPlane) -> None:
    metadata = await (await cp.client.get("/.well-known/oauth-authorization-server")).json()
    assert metadata["issuer"] == cp.settings.base_url


@pytest.mark.parametrize("url", ["dsn.example", "ftp://dsn.example", "https://dsn.example/?a=1",
                                 "https://dsn.example/#top"])
def test_a_public_url_that_cannot_be_an_issuer_is_refused(tmp_path: Path, url: str) -> None:
    from common.errors import InvalidSetting
    from controlplane.settings import Settings

    with pytest.raises(InvalidSetting, match="public_url"):
        Settings(state_dir=tmp_path, public_url=url)
