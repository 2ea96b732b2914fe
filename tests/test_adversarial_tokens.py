"""A corpus of forged, confused, malformed and revoked bearer tokens against the real app.

Every entry of ``CORPUS`` is presented to a real control plane (aiohttp test server, real SQLite)
and must be refused: 401 (or 403 where the token is genuine but not allowed), an RFC 9457
problem+json body, a deny record in the audit log, never a 2xx or a 5xx. The test counts
acceptances and asserts there are none. Entries refused by the HTTP parser itself (headers beyond
aiohttp's size limits) never reach the app: they must be a 4xx (or a closed connection) and leave
no audit record.

The cases of ``test_cp_api.ATTACKS`` (alg none, HS256 with the public key, tampered payload, a key
that is not published, expired, immature, wrong issuer/audience/kind, claim types, lifetime beyond
the cap, a revoked jti, ``not_before``) are not repeated here, nor are admin and consumer tokens
exchanging (test_cp_api::test_only_project_tokens_exchange), a project token registering a consumer
(test_cp_sessions_api::test_project_tokens_cannot_register_consumers) or project and consumer tokens
on every admin route
(test_adversarial_rest::test_project_and_consumer_tokens_reach_no_admin_function); this corpus
adds the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cp_helpers import (
    HTTP_LAYER_REFUSALS,
    ClientFactory,
    ControlPlane,
    http_layer_refusal,
    sql,
    start_control_plane,
    write_policy,
)
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_cp_api import assert_problem, b64

from controlplane.signing import public_jwk
from controlplane.store.admins import enable_admin
from controlplane.store.tokens import TokenRecord

API = "/api/v1/projects"
ALPHA = "/api/v1/projects/alpha"
EXCHANGE = "/api/v1/token"
SESSION_BODY = {"kind": "session"}


@dataclass
class Target:
    """The running control plane and the genuine tokens the forgeries start from."""

    cp: ControlPlane
    tokens: dict[str, str] = field(default_factory=dict)

    def kid(self) -> str:
        return self.cp.services.keyring.signing_key()[0]

    def now(self) -> int:
        return int(self.cp.clock())


@dataclass(frozen=True)
class Forgery:
    """One token to present. ``build`` returns the token, or the whole Authorization value when
    ``raw`` is set. ``status`` is the answer owed: 401, 403, or 400 for an HTTP-layer refusal."""

    name: str
    build: Callable[[Target], str]
    method: str = "GET"
    path: str = API
    body: dict[str, Any] | None = None
    status: int = 401
    raw: bool = False


def signed(header: dict[str, Any] | str, payload: dict[str, Any] | str,
           key: Ed25519PrivateKey) -> str:
    """A JWS over exactly these JSON texts (strings pass through, so names can repeat)."""
    texts = [part if isinstance(part, str) else json.dumps(part) for part in (header, payload)]
    signing_input = ".".join(b64(text.encode()) for text in texts)
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def real(t: Target, header: dict[str, Any] | str, payload: dict[str, Any] | str) -> str:
    """Signed with the service's own key: only the header or claims are wrong."""
    return signed(header, payload, t.cp.services.keyring.signing_key()[1])


def header(t: Target, **extra: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "kid": t.kid(), "typ": "JWT", **extra}


def claims_text(t: Target) -> str:
    return json.dumps(t.cp.claims())


# --- signatures and algorithms --------------------------------------------------------------------

def flipped_signature(t: Target) -> str:
    head, payload, signature = t.tokens["alpha"].split(".")
    middle = len(signature) // 2  # a middle character: every one of its bits is signature data
    swapped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{payload}.{signature[:middle]}{swapped}{signature[middle + 1:]}"


def truncated_signature(t: Target) -> str:
    return t.tokens["alpha"][:-10]


def foreign_algorithm(algorithm: str) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        key: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    if algorithm.startswith("RS") else ec.generate_private_key(ec.SECP256R1()))
        return jwt.encode(t.cp.claims(), key, algorithm=algorithm,
                          headers={"kid": t.kid(), "typ": "JWT"})
    return build


def alg_spelling(alg: str) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        return real(t, {"alg": alg, "kid": t.kid(), "typ": "JWT"}, t.cp.claims())
    return build


def embedded_jwk(t: Target) -> str:
    # The attacker's own key, offered in the header for the verifier to trust.
    attacker = Ed25519PrivateKey.generate()
    jwk = public_jwk(attacker.public_key())
    return signed(header(t, kid=jwk["kid"], jwk=jwk), t.cp.claims(), attacker)


# --- kinds, audiences and scopes ------------------------------------------------------------------

def genuine(name: str) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        return t.tokens[name]
    return build


def gateway_kind(t: Target) -> str:
    return t.cp.sign(t.cp.claims(token_use="gateway", scope="sessions:read"))


def audience_list(t: Target) -> str:
    return t.cp.sign(t.cp.claims(aud=[t.cp.settings.api_audience, "elsewhere"]))


# --- malformed ------------------------------------------------------------------------------------

def raw_text(text: str) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        return text
    return build


def parts(count: int) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        segments = t.tokens["alpha"].split(".")
        return ".".join((segments * 2)[:count])
    return build


def standard_base64(t: Target) -> str:
    head, payload, signature = t.tokens["alpha"].split(".")
    return f"{head}.{payload}.{signature}+/=="


def non_json_header(t: Target) -> str:
    return real(t, "{alg: EdDSA}", claims_text(t))


def array_payload(t: Target) -> str:
    return real(t, header(t), json.dumps([t.cp.claims()]))


def huge_claim(t: Target) -> str:
    return t.cp.sign(t.cp.claims(sub="m" * 5000))


# --- header parameters ----------------------------------------------------------------------------

def with_kid(kid: Any) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        return real(t, header(t, kid=kid), t.cp.claims())
    return build


def with_header(**extra: Any) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        return real(t, header(t, **extra), t.cp.claims())
    return build


def repeated_header_alg(t: Target) -> str:
    text = f'{{"alg": "none", "kid": "{t.kid()}", "typ": "JWT", "alg": "EdDSA"}}'
    return real(t, text, claims_text(t))


def repeated_claim(name: str, first: Any, last: Any) -> Callable[[Target], str]:
    def build(t: Target) -> str:
        claims = {key: value for key, value in t.cp.claims().items() if key != name}
        text = json.dumps(claims)[:-1] + f", {json.dumps(name)}: {json.dumps(first)}, " \
                                          f"{json.dumps(name)}: {json.dumps(last)}}}"
        return real(t, header(t), text)
    return build


CORPUS: list[Forgery] = [
    # signatures and algorithms
    Forgery("one signature character changed", flipped_signature, path=ALPHA),
    Forgery("signature truncated", truncated_signature, path=ALPHA),
    Forgery("RS256 token with the service's kid", foreign_algorithm("RS256")),
    Forgery("ES256 token with the service's kid", foreign_algorithm("ES256")),
    Forgery("alg 'eddsa' (case)", alg_spelling("eddsa")),
    Forgery("alg 'Ed25519'", alg_spelling("Ed25519")),
    Forgery("alg 'EdDSA ' (trailing space)", alg_spelling("EdDSA ")),
    Forgery("embedded jwk naming the attacker's key", embedded_jwk),
    # confused kinds and audiences
    Forgery("session token (API audience) exchanging", genuine("api_session"), "POST", EXCHANGE,
            SESSION_BODY),
    Forgery("session token (gateway audience) exchanging", genuine("session"), "POST", EXCHANGE,
            SESSION_BODY),
    Forgery("gateway-kind token on the API", gateway_kind),
    Forgery("audience as a list holding ours", audience_list),
    Forgery("genuine project token lacking the scope", genuine("narrow"), "POST",
            "/api/v1/sessions", {"project": "alpha", "template": "4dstem", "params": {},
                                 "client_key": "x" * 40}, status=403),
    # malformed
    Forgery("empty bearer", raw_text("Bearer "), raw=True),
    Forgery("scheme only", raw_text("Bearer"), raw=True),
    Forgery("two tokens", lambda t: f"Bearer {t.tokens['alpha']} {t.tokens['alpha']}", raw=True),
    Forgery("token as Basic credentials", lambda t: f"Basic {t.tokens['admin']}", raw=True),
    Forgery("one part", parts(1)),
    Forgery("two parts", parts(2)),
    Forgery("four parts", parts(4)),
    Forgery("standard base64 alphabet and padding", standard_base64),
    Forgery("non-base64 bytes", raw_text("!!!.$$$.%%%")),
    Forgery("header is not JSON", non_json_header),
    Forgery("payload is a JSON array", array_payload),
    Forgery("payload is JSON null", lambda t: real(t, header(t), "null")),
    Forgery("5,000-character subject", huge_claim),
    # header parameters
    Forgery("unknown kid", with_kid("k-" + "0" * 40)),
    Forgery("path-like kid", with_kid("../../keys/../admin.token")),
    Forgery("4 KiB kid", with_kid("k" * 4096)),
    Forgery("kid as an object", with_kid({"kid": "x"})),
    Forgery("jku header", with_header(jku="https://evil.example/jwks.json")),
    Forgery("x5u header", with_header(x5u="https://evil.example/cert.pem")),
    Forgery("x5c header", with_header(x5c=["MIIB"])),
    Forgery("crit with an unknown extension", with_header(crit=["dsn-magic"], **{"dsn-magic": 1})),
    Forgery("b64 false (unencoded payload)", with_header(b64=False, crit=["b64"])),
    Forgery("typ 'at+jwt'", with_header(typ="at+jwt")),
    # revoked and dead
    Forgery("revoked admin token", genuine("revoked_admin")),
    Forgery("consumer token whose project token is revoked", genuine("orphan"),
            path="/api/v1/sessions/s0/consumers/c0", method="PUT"),
    Forgery("token of a deleted project", genuine("deleted"), path="/api/v1/projects/gone"),
    # repeated names (the last would win in a lenient parser)
    Forgery("alg repeated: none then EdDSA", repeated_header_alg),
    Forgery("token_use repeated: project then admin", repeated_claim("token_use", "project",
                                                                       "admin")),
    Forgery("scope repeated", repeated_claim("scope", "", "projects:read projects:write")),
    # beyond what the HTTP parser takes
    Forgery("64 KiB token", lambda t: "Bearer " + t.tokens["alpha"] + "A" * 65536, raw=True,
            status=400),
    Forgery("1 MiB Authorization header", lambda t: "Bearer " + "a" * (1 << 20), raw=True,
            status=400),
]


async def _revoked_admin(cp: ControlPlane) -> str:
    """An admin token the store knows, of an admin of its own (as ``dsn admin init`` records
    them), then revoked."""
    claims = cp.claims(jti="admin-to-revoke", sub="former-admin")
    await enable_admin(cp.services.store, TokenRecord(
        jti=claims["jti"], project=None, kind="admin", subject=claims["sub"],
        scope=claims["scope"], issued_at=claims["iat"], expires_at=claims["exp"]),
        by="test", at=cp.clock(), exists_ok=False)
    token = cp.sign(claims)
    assert (await cp.call("GET", API, token)).status == 200  # genuine until revoked
    assert (await cp.admin("DELETE", "/api/v1/tokens/admin-to-revoke")).status == 200
    return token


async def _dead_project_tokens(cp: ControlPlane) -> dict[str, str]:
    """The token of a project removed from the store behind the service's back (no API deletes
    projects)."""
    await cp.create_project("gone")
    tokens = {"deleted": (await cp.project_token("gone"))["token"]}
    sql(cp.services.settings.database, "DELETE FROM projects WHERE name = 'gone'")
    return tokens


@pytest.fixture
async def target(aiohttp_client: ClientFactory, tmp_path: Path) -> Target:
    policy = write_policy(tmp_path / "policy", per_token="10000/minute", per_project="10000/minute",
                          unauthenticated_per_source="10000/minute")
    # Every refusal its own record, so each forgery's can be told apart (floods are summed up
    # otherwise: test_cp_api.py covers that).
    cp = await start_control_plane(aiohttp_client, tmp_path / "state", policy_path=policy,
                                   audit_denial_window_s=0)
    await cp.create_project("alpha")
    alpha = (await cp.project_token("alpha"))["token"]
    orphan_parent = await cp.project_token("alpha", subject="leaver")
    t = Target(cp, {
        "admin": cp.admin_token, "alpha": alpha,
        "narrow": (await cp.project_token("alpha", scope="projects:read"))["token"],
        "session": (await cp.exchange(alpha, kind="session"))["token"],
        "api_session": (await cp.exchange(alpha, kind="session",
                                          audience=cp.settings.api_audience))["token"],
        "orphan": (await cp.exchange(orphan_parent["token"], kind="consumer"))["token"],
        "revoked_admin": await _revoked_admin(cp),
        **await _dead_project_tokens(cp),
    })
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{orphan_parent['jti']}")).status == 200
    return t


async def _present(t: Target, forgery: Forgery) -> tuple[int, str | None]:
    """Presents one forgery; returns (status, None) or (status, what was wrong with the answer)."""
    value = forgery.build(t)
    authorization = value if forgery.raw else f"Bearer {value}"
    before = len(t.cp.audit_rows())
    request = t.cp.client.request(forgery.method, forgery.path, json=forgery.body,
                                  headers={"Authorization": authorization})
    if forgery.status == 400:  # refused by the HTTP parser: the app never sees it
        status = await http_layer_refusal(request)
        if status not in (None, *HTTP_LAYER_REFUSALS):
            return status or 0, f"status {status}"
        unaudited = t.cp.audit_rows()[before:] == []
        return status or 400, None if unaudited else "an HTTP-layer refusal was audited"
    response = await request
    if response.status != forgery.status:
        return response.status, f"status {response.status}: {await response.text()}"
    rows = t.cp.audit_rows()[before:]
    problem = await assert_problem(response, forgery.status)
    if len(value) > 20 and value.split()[-1] in json.dumps(problem):
        return response.status, "the answer echoes the token"
    if [row[4] for row in rows] != ["deny"]:
        return response.status, f"audit records {rows}"
    return response.status, None


async def test_genuine_tokens_the_forgeries_start_from_are_accepted(target: Target) -> None:
    """Each forgery changes one thing: the unchanged originals get in where they belong."""
    cp = target.cp
    assert (await cp.call("GET", API, cp.sign(cp.claims()))).status == 200
    assert (await cp.call("GET", ALPHA, target.tokens["alpha"])).status == 200
    assert (await cp.call("GET", "/api/v1/projects/alpha", target.tokens["narrow"])).status == 200
    exchanged = await cp.call("POST", EXCHANGE, target.tokens["alpha"], json=SESSION_BODY)
    assert exchanged.status == 200


async def test_no_forged_confused_malformed_or_revoked_token_is_accepted(target: Target) -> None:
    outcomes = [(forgery.name, *await _present(target, forgery)) for forgery in CORPUS]
    accepted = [name for name, status, _ in outcomes if 200 <= status < 300]
    server_errors = [name for name, status, _ in outcomes if status >= 500]
    wrong = [f"{name}: {problem}" for name, _, problem in outcomes if problem]
    print(f"token corpus: {len(CORPUS)} tokens, {len(accepted)} accepted, "
          f"{len(server_errors)} server errors")
    assert accepted == [] and server_errors == [] and wrong == []
    assert (await target.cp.client.get("/healthz")).status == 200


def test_corpus_names_are_unique() -> None:
    assert len({forgery.name for forgery in CORPUS}) == len(CORPUS)
