"""Token issue and verification (pure), and the store-backed Authenticator over real SQLite."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import InvalidRequest, TokenError
from controlplane.store.admins import enable_admin
from controlplane.store.engine import Store
from controlplane.store.projects import Project, create_project, update_project
from controlplane.store.tokens import (
    Revocations,
    TokenRecord,
    add_token,
    is_revoked,
    revoke_token,
)
from controlplane.tokens import (
    MAX_TOKEN_BYTES,
    Authenticator,
    Claims,
    Surface,
    TokenKind,
    TokenService,
)

ISSUER = "https://dsn.test"
NOW = 1_700_000_000.0
LEEWAY = 30
CAPS = {TokenKind.ADMIN: 86400, TokenKind.PROJECT: 30 * 86400, TokenKind.SESSION: 3600,
        TokenKind.CONSUMER: 3600, TokenKind.GATEWAY: 86400}
API = Surface("dsn-api", frozenset({TokenKind.PROJECT, TokenKind.ADMIN}))
SESSION_API = Surface("dsn-api", frozenset({TokenKind.SESSION}))


class KeyRing:
    """A minimal key ring: the newest key signs, every key it holds verifies."""

    def __init__(self) -> None:
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.add("k1")

    def add(self, kid: str) -> None:
        self.keys[kid] = Ed25519PrivateKey.generate()

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        kid = list(self.keys)[-1]
        return kid, self.keys[kid]

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        key = self.keys.get(kid)
        return key.public_key() if key else None


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(ring: KeyRing, clock: Clock) -> TokenService:
    return TokenService(ISSUER, ring, clock=clock, leeway_s=LEEWAY, lifetime_caps=CAPS)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def good_payload(**changes: Any) -> dict[str, Any]:
    payload = {"iss": ISSUER, "aud": "dsn-api", "sub": "alice", "iat": int(NOW),
               "exp": int(NOW) + 600, "jti": "j-1", "token_use": "project", "project": "p1",
               "scope": "sessions:write token:exchange"}
    payload.update(changes)
    return payload


def forge(ring: KeyRing, payload: dict[str, Any], header: dict[str, Any] | None = None,
          kid: str = "k1") -> str:
    """Signs arbitrary JSON with a real key of the ring, bypassing the service's issue()."""
    head = {"alg": "EdDSA", "kid": kid, "typ": "JWT"} if header is None else header
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(payload).encode())}"
    signature = ring.keys[kid].sign(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def reason(service: TokenService, token: str, surface: Surface = API) -> str:
    with pytest.raises(TokenError) as caught:
        service.verify(token, surface)
    return caught.value.reason


# --- issue and the happy path ---------------------------------------------------------------

def test_issued_token_verifies_with_every_claim(service: TokenService) -> None:
    token, claims = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1",
                                  scope={"sessions:write"}, ttl_s=600, audience="dsn-api")
    assert service.verify(token, API) == claims
    assert claims == Claims(ISSUER, "dsn-api", "alice", int(NOW), int(NOW) + 600, claims.jti,
                            TokenKind.PROJECT, "p1", frozenset({"sessions:write"}))
    assert len(claims.jti) >= 16
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}


def test_forged_good_payload_verifies(service: TokenService, ring: KeyRing) -> None:
    # The forge() helper is faithful: every rejection below is due to the one thing changed.
    assert service.verify(forge(ring, good_payload()), API).jti == "j-1"


def test_jti_is_unique_and_safe_on_a_command_line(service: TokenService) -> None:
    jtis = {service.issue(kind=TokenKind.ADMIN, subject="root", project=None, scope=set(),
                          ttl_s=60, audience="dsn-api")[1].jti for _ in range(50)}
    assert len(jtis) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", jti) for jti in jtis)  # never read as an option


def test_rotation_newest_signs_old_still_verifies(service: TokenService, ring: KeyRing) -> None:
    old, _ = service.issue(kind=TokenKind.ADMIN, subject="root", project=None, scope=set(),
                           ttl_s=60, audience="dsn-api")
    ring.add("k2")
    new, _ = service.issue(kind=TokenKind.ADMIN, subject="root", project=None, scope=set(),
                           ttl_s=60, audience="dsn-api")
    assert jwt.get_unverified_header(new)["kid"] == "k2"
    assert service.verify(old, API).sub == service.verify(new, API).sub == "root"
    del ring.keys["k1"]  # retired
    assert reason(service, old) == "unknown_key"


@pytest.mark.parametrize("ttl", [0, -5, CAPS[TokenKind.SESSION] + 1, 1.5, True, "60"])
def test_issue_refuses_ttl_outside_the_cap(service: TokenService, ttl: Any) -> None:
    with pytest.raises(InvalidRequest, match="ttl"):
        service.issue(kind=TokenKind.SESSION, subject="s", project="p1", scope=set(), ttl_s=ttl,
                      audience="dsn-api")


@pytest.mark.parametrize(("kind", "project"), [(TokenKind.PROJECT, None),
                                               (TokenKind.ADMIN, "p1"), (TokenKind.SESSION, "")])
def test_issue_refuses_wrong_project_binding(service: TokenService, kind: TokenKind,
                                             project: str | None) -> None:
    with pytest.raises(InvalidRequest, match="project"):
        service.issue(kind=kind, subject="s", project=project, scope=set(), ttl_s=60,
                      audience="dsn-api")


def test_issue_refuses_kind_without_cap(ring: KeyRing, clock: Clock) -> None:
    service = TokenService(ISSUER, ring, clock=clock, lifetime_caps={TokenKind.ADMIN: 60})
    with pytest.raises(InvalidRequest, match="no lifetime"):
        service.issue(kind=TokenKind.PROJECT, subject="s", project="p", scope=set(), ttl_s=1,
                      audience="dsn-api")


def test_issue_refuses_bad_scope_names(service: TokenService) -> None:
    with pytest.raises(InvalidRequest, match="scope"):
        service.issue(kind=TokenKind.PROJECT, subject="s", project="p1", scope={"two words"},
                      ttl_s=60, audience="dsn-api")


# --- algorithm and header attacks -----------------------------------------------------------

def test_alg_none_refused(service: TokenService) -> None:
    header = b64(json.dumps({"alg": "none", "kid": "k1", "typ": "JWT"}).encode())
    payload = b64(json.dumps(good_payload()).encode())
    assert reason(service, f"{header}.{payload}.") == "malformed"
    assert reason(service, f"{header}.{payload}.{b64(b'x')}") == "algorithm"


def test_hs256_signed_with_the_public_key_refused(service: TokenService, ring: KeyRing) -> None:
    public = ring.keys["k1"].public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64(json.dumps(good_payload()).encode())}"
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    assert reason(service, f"{signing_input}.{b64(mac)}") == "algorithm"
    raw = ring.keys["k1"].public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
    mac = hmac.new(raw, signing_input.encode(), hashlib.sha256).digest()
    assert reason(service, f"{signing_input}.{b64(mac)}") == "algorithm"


def test_rs256_token_refused(service: TokenService) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(good_payload(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert reason(service, token) == "algorithm"


@pytest.mark.parametrize("extra", [
    {"jku": "https://evil.example/jwks.json"}, {"x5u": "https://evil.example/cert"},
    {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}}, {"crit": ["exp"]},
    {"b64": False, "crit": ["b64"]}, {"x5c": ["AAAA"]},
])
def test_key_naming_and_critical_headers_refused(service: TokenService, ring: KeyRing,
                                                 extra: dict[str, Any]) -> None:
    header = {"alg": "EdDSA", "kid": "k1", "typ": "JWT", **extra}
    assert reason(service, forge(ring, good_payload(), header)) == "header"


@pytest.mark.parametrize("header", [
    {"alg": "EdDSA", "typ": "JWT"}, {"alg": "EdDSA", "kid": 1}, {"alg": "EdDSA", "kid": ""},
    {"alg": "EdDSA", "kid": "k1", "typ": "at+jwt"},
])
def test_missing_kid_or_wrong_typ_refused(service: TokenService, ring: KeyRing,
                                          header: dict[str, Any]) -> None:
    assert reason(service, forge(ring, good_payload(), header)) == "header"


def test_unknown_kid_refused(service: TokenService, ring: KeyRing) -> None:
    ring.add("stranger")
    token = forge(ring, good_payload(), kid="stranger")
    del ring.keys["stranger"]
    assert reason(service, token) == "unknown_key"


def test_signature_by_another_published_key_refused(service: TokenService, ring: KeyRing) -> None:
    ring.add("k2")
    token = forge(ring, good_payload(), {"alg": "EdDSA", "kid": "k1"}, kid="k2")
    assert reason(service, token) == "signature"


def test_tampered_payload_refused(service: TokenService) -> None:
    token, _ = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1",
                             scope={"sessions:write"}, ttl_s=600, audience="dsn-api")
    header, payload, signature = token.split(".")
    claims = json.loads(unb64(payload))
    claims["project"] = "p2"
    tampered = b64(json.dumps(claims).encode())
    assert reason(service, f"{header}.{tampered}.{signature}") == "signature"


def test_tampered_header_refused(service: TokenService, ring: KeyRing) -> None:
    token, _ = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1",
                             scope=set(), ttl_s=600, audience="dsn-api")
    _, payload, signature = token.split(".")
    header = b64(json.dumps({"alg": "EdDSA", "kid": "k1"}).encode())  # typ dropped
    assert reason(service, f"{header}.{payload}.{signature}") == "signature"


def test_oversized_token_refused_before_parsing(service: TokenService, ring: KeyRing) -> None:
    token = forge(ring, good_payload(sub="a" * MAX_TOKEN_BYTES))
    assert reason(service, token) == "malformed"


@pytest.mark.parametrize("garbage", [
    "", "abc", "a.b", "a.b.c.d", "...", "éé.éé.éé", "Bearer x.y.z", "eyJ.eyJ.", " a.b.c",
    b64(b"[1]") + "." + b64(b"{}") + ".AA", b64(b"{") + "." + b64(b"{}") + ".AA",
    b64(b"[" * 6000) + ".e30.AA",  # nesting deep enough to exhaust a recursive JSON parser
])
def test_garbage_refused_as_malformed(service: TokenService, garbage: str) -> None:
    assert reason(service, garbage) == "malformed"


def test_non_object_payload_refused(service: TokenService, ring: KeyRing) -> None:
    head = b64(json.dumps({"alg": "EdDSA", "kid": "k1"}).encode())
    signing_input = f"{head}.{b64(b'[1, 2]')}"
    token = f"{signing_input}.{b64(ring.keys['k1'].sign(signing_input.encode()))}"
    assert reason(service, token) == "malformed"


# --- claims: presence, types, values ----------------------------------------------------------

@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "iat", "exp", "jti", "token_use",
                                   "project", "scope"])
def test_every_claim_is_required(service: TokenService, ring: KeyRing, claim: str) -> None:
    payload = good_payload()
    del payload[claim]
    assert reason(service, forge(ring, payload)) == "missing_claim"


@pytest.mark.parametrize(("claim", "value"), [
    ("exp", str(int(NOW) + 600)), ("exp", True), ("exp", float(NOW + 600)), ("exp", None),
    ("exp", -1), ("exp", [int(NOW)]), ("iat", str(int(NOW))), ("iat", False), ("iat", NOW + 0.5),
    ("iss", 1), ("iss", ""), ("aud", ["dsn-api"]), ("aud", None), ("sub", 7), ("sub", ""),
    ("jti", 12), ("jti", None), ("token_use", "root"), ("token_use", 1), ("token_use", None),
    ("project", 1), ("project", ""), ("project", ["p1"]), ("project", None),
    ("scope", ["sessions:write"]), ("scope", None), ("scope", 3), ("scope", "a  b"),
    ("scope", " a"), ("scope", "UPPER"), ("nbf", int(NOW)), ("admin", True),
])
def test_wrongly_typed_or_extra_claims_refused(service: TokenService, ring: KeyRing, claim: str,
                                               value: Any) -> None:
    # pyjwt treats null as absent, so a null required claim may surface as missing_claim.
    assert reason(service, forge(ring, good_payload(**{claim: value}))) in (
        "invalid_claim", "missing_claim")


def test_admin_token_with_a_project_refused(service: TokenService, ring: KeyRing) -> None:
    payload = good_payload(token_use="admin", project="p1")
    assert reason(service, forge(ring, payload)) == "invalid_claim"


def test_wrong_issuer_audience_kind(service: TokenService, ring: KeyRing) -> None:
    assert reason(service, forge(ring, good_payload(iss="https://other"))) == "issuer"
    assert reason(service, forge(ring, good_payload(aud="dsn-gateway"))) == "audience"
    assert reason(service, forge(ring, good_payload()), SESSION_API) == "kind"


def test_lifetime_over_the_cap_refused(service: TokenService, ring: KeyRing) -> None:
    cap = CAPS[TokenKind.PROJECT]
    assert service.verify(forge(ring, good_payload(exp=int(NOW) + cap)), API)
    assert reason(service, forge(ring, good_payload(exp=int(NOW) + cap + 1))) == "lifetime"
    assert reason(service, forge(ring, good_payload(exp=int(NOW)))) == "lifetime"


def test_expired_respects_leeway(service: TokenService, ring: KeyRing, clock: Clock) -> None:
    token = forge(ring, good_payload())
    clock.now = NOW + 600 + LEEWAY - 1
    assert service.verify(token, API).sub == "alice"
    clock.now = NOW + 600 + LEEWAY
    assert reason(service, token) == "expired"


def test_immature_beyond_leeway(service: TokenService, ring: KeyRing) -> None:
    within = forge(ring, good_payload(iat=int(NOW) + LEEWAY, exp=int(NOW) + 600))
    assert service.verify(within, API).sub == "alice"
    beyond = forge(ring, good_payload(iat=int(NOW) + LEEWAY + 1, exp=int(NOW) + 600))
    assert reason(service, beyond) == "immature"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_tokens_never_verify(data: st.DataObject) -> None:
    ring = KeyRing()
    service = TokenService(ISSUER, ring, clock=Clock(), leeway_s=LEEWAY, lifetime_caps=CAPS)
    token, _ = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1",
                             scope={"sessions:write"}, ttl_s=600, audience="dsn-api")
    position = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[position]))
    mutated = token[:position] + replacement + token[position + 1:]
    try:
        claims = service.verify(mutated, API)
    except TokenError:
        return
    # base64url's last character carries spare bits: a change there can decode to the same bytes.
    assert unb64(mutated.split(".")[2]) == unb64(token.split(".")[2])
    assert claims.to_payload() == json.loads(unb64(token.split(".")[1]))


# --- Authenticator over the real SQLite store -------------------------------------------------

@pytest.fixture
async def store(tmp_path: Path) -> Any:
    opened = await Store.open(tmp_path / "state" / "cp.sqlite")
    await create_project(opened, Project("p1", created_at=NOW - 100))
    yield opened
    await opened.close()


def record(claims: Claims, parent: str | None = None) -> TokenRecord:
    return TokenRecord(claims.jti, claims.project, claims.kind.value, claims.sub,
                       " ".join(sorted(claims.scope)), claims.iat, claims.exp, None, parent)


async def test_authenticator_accepts_then_refuses_revoked(service: TokenService, store: Store,
                                                          clock: Clock) -> None:
    auth = Authenticator(service, Revocations(store), clock)
    token, claims = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1",
                                  scope=set(), ttl_s=600, audience="dsn-api")
    await add_token(store, record(claims))
    assert await auth.authenticate(token, API) == claims
    await revoke_token(store, claims.jti, at=NOW)
    with pytest.raises(TokenError) as caught:
        await auth.authenticate(token, API)
    assert caught.value.reason == "revoked"


async def test_exchanged_token_dies_with_its_parent(service: TokenService, store: Store,
                                                    clock: Clock) -> None:
    auth = Authenticator(service, Revocations(store), clock)
    _, parent = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1", scope=set(),
                              ttl_s=600, audience="dsn-api")
    child_token, child = service.issue(kind=TokenKind.SESSION, subject="alice", project="p1",
                                       scope=set(), ttl_s=60, audience="dsn-api")
    await add_token(store, record(parent))
    await add_token(store, record(child, parent=parent.jti))
    assert (await auth.authenticate(child_token, SESSION_API)).jti == child.jti
    await revoke_token(store, parent.jti, at=NOW)
    with pytest.raises(TokenError) as caught:
        await auth.authenticate(child_token, SESSION_API)
    assert caught.value.reason == "revoked"


async def test_project_not_before_kills_older_tokens(service: TokenService, store: Store,
                                                     clock: Clock) -> None:
    auth = Authenticator(service, Revocations(store), clock)
    old, _ = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1", scope=set(),
                           ttl_s=600, audience="dsn-api")
    await update_project(store, "p1", not_before=NOW + 1)
    clock.now = NOW + 1
    new, _ = service.issue(kind=TokenKind.PROJECT, subject="alice", project="p1", scope=set(),
                           ttl_s=600, audience="dsn-api")
    assert (await auth.authenticate(new, API)).iat == int(NOW + 1)
    with pytest.raises(TokenError) as caught:
        await auth.authenticate(old, API)
    assert caught.value.reason == "revoked"


async def test_token_of_a_deleted_project_refused(service: TokenService, store: Store,
                                                  clock: Clock) -> None:
    auth = Authenticator(service, Revocations(store), clock)
    await create_project(store, Project("p2", created_at=NOW))
    token, _ = service.issue(kind=TokenKind.PROJECT, subject="bob", project="p2", scope=set(),
                             ttl_s=600, audience="dsn-api")
    # No API deletes projects; one removed behind the service's back takes its tokens with it.
    await store.write(lambda conn: conn.execute("DELETE FROM projects WHERE name = 'p2'"))
    with pytest.raises(TokenError) as caught:
        await auth.authenticate(token, API)
    assert caught.value.reason == "unknown_project"


async def test_admin_token_needs_no_project_but_an_active_admin(service: TokenService,
                                                                store: Store, clock: Clock) -> None:
    auth = Authenticator(service, Revocations(store), clock)
    token, claims = service.issue(kind=TokenKind.ADMIN, subject="root", project=None,
                                  scope={"projects:write"}, ttl_s=600, audience="dsn-api")
    with pytest.raises(TokenError) as caught:  # signed by the real key, but "root" is no admin
        await auth.authenticate(token, API)
    assert caught.value.reason == "unknown_admin"
    await enable_admin(store, record(claims), by="test", at=NOW, exists_ok=False)
    assert await auth.authenticate(token, API) == claims
    # Removed while a token of it is on record unrevoked (an issue racing the removal):
    await store.write(lambda conn: conn.execute(
        "UPDATE admins SET removed_at = ? WHERE name = 'root'", (NOW,)))
    assert not await is_revoked(store, claims.jti, NOW)
    with pytest.raises(TokenError) as caught:
        await auth.authenticate(token, API)
    assert caught.value.reason == "unknown_admin"
