"""Token issue and verification: EdDSA-signed JWTs with a fixed, strictly typed claim set (SPEC §3).

Every token carries exactly these claims, each with one JSON type:

    iss str · aud str · sub str · iat int · exp int · jti str · token_use str (a TokenKind)
    project str | null (a string for project-bound kinds, null for admin and gateway) · scope str

``TokenService.verify`` is pure (no I/O; the time comes from the injected clock). It refuses, in
this order: oversized or unparsable input (malformed), any algorithm but EdDSA (algorithm), header
parameters other than alg/kid/typ, a repeated header name or a typ other than "JWT" (header), a kid
the key ring does not know (unknown_key), a bad signature (signature), a payload that is not a JSON
object (malformed) or repeats a claim (invalid_claim), a missing claim (missing_claim), an unknown
or wrongly typed claim (invalid_claim), then the values: issuer, audience, kind, lifetime, expired,
immature. ``Authenticator`` adds the store-backed
checks: revoked jti, project not_before, project still existing, admin still active.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.errors import (
    ExpiredToken,
    ImmatureToken,
    InvalidAlgorithm,
    InvalidAudience,
    InvalidClaim,
    InvalidHeader,
    InvalidIssuer,
    InvalidRequest,
    InvalidSignature,
    LifetimeTooLong,
    MalformedToken,
    MissingClaim,
    RevokedToken,
    TokenError,
    UnknownAdmin,
    UnknownKey,
    UnknownProject,
    WrongKind,
)
from controlplane.schemas import RepeatedName, json_without_repeats

MAX_TOKEN_BYTES = 8 * 1024
ALGORITHM = "EdDSA"
# Only what our own issuer writes. jku/x5u/jwk/x5c would let a token name its own key, crit/b64
# change how it is parsed: refusing everything else closes those doors for good.
ALLOWED_HEADERS = frozenset({"alg", "kid", "typ"})
SCOPE_TOKEN = re.compile(r"^[a-z][a-z0-9_.-]*(:[a-z0-9_.*-]+)*$")
_JWS_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class TokenKind(enum.StrEnum):
    ADMIN = "admin"
    PROJECT = "project"
    SESSION = "session"
    CONSUMER = "consumer"
    GATEWAY = "gateway"

    @property
    def project_bound(self) -> bool:
        """Project, session and consumer tokens act for one project; admin and gateway for none."""
        return self in (TokenKind.PROJECT, TokenKind.SESSION, TokenKind.CONSUMER)


@dataclass(frozen=True)
class Claims:
    iss: str
    aud: str
    sub: str
    iat: int
    exp: int
    jti: str
    kind: TokenKind
    project: str | None
    scope: frozenset[str]

    def to_payload(self) -> dict[str, Any]:
        return {
            "iss": self.iss, "aud": self.aud, "sub": self.sub, "iat": self.iat, "exp": self.exp,
            "jti": self.jti, "token_use": self.kind.value, "project": self.project,
            "scope": " ".join(sorted(self.scope)),
        }


@dataclass(frozen=True)
class Surface:
    """Where a token is presented: the audience it must name and the kinds accepted there."""

    audience: str
    kinds: frozenset[TokenKind]


class KeySource(Protocol):
    def signing_key(self) -> tuple[str, Ed25519PrivateKey]: ...

    def public_key(self, kid: str) -> Ed25519PublicKey | None: ...

    async def lookup(self, kid: str) -> Ed25519PublicKey | None:
        """``public_key``, after looking again for a kid not known yet (another replica's)."""


Clock = Callable[[], float]

CLAIMS = ("iss", "aud", "sub", "iat", "exp", "jti", "token_use", "project", "scope")
# pyjwt checks the signature only; the payload is parsed once, here, and every claim (presence,
# type, time with the injected clock, issuer, audience) is checked by the validators below.
_JWS = jwt.PyJWS()


# --- one validator per claim: each returns the typed value or raises InvalidClaim ---------------

def _bad(name: str, expected: str) -> InvalidClaim:
    return InvalidClaim(f"claim '{name}' must be {expected}")


def _nonempty_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise _bad(name, "a non-empty string of at most 256 characters")
    return value


def _int_time(name: str, value: Any) -> int:
    # bool is a subclass of int: `true` must not pass as a timestamp.
    if type(value) is not int or value < 0:
        raise _bad(name, "a non-negative integer (seconds since the epoch)")
    return value


def _validate_kind(value: Any) -> TokenKind:
    if isinstance(value, str) and value in TokenKind._value2member_map_:
        return TokenKind(value)
    raise _bad("token_use", "one of " + ", ".join(kind.value for kind in TokenKind))


def _validate_project(value: Any) -> str | None:
    if value is None:
        return None
    return _nonempty_str("project", value)


def _validate_scope(value: Any) -> frozenset[str]:
    if not isinstance(value, str) or len(value) > 2048:
        raise _bad("scope", "a space-separated string")
    parts = value.split(" ") if value else []
    if any(not SCOPE_TOKEN.match(part) for part in parts):
        raise _bad("scope", "space-separated scope names (single spaces, no empty entries)")
    return frozenset(parts)


def typed_claims(payload: Mapping[str, Any]) -> Claims:
    """The claim dispatcher: presence, no extras, then one validator per claim."""
    missing = [name for name in CLAIMS if name not in payload]
    if missing:
        raise MissingClaim(f"claim '{missing[0]}' is required")
    extra = sorted(set(payload) - set(CLAIMS))
    if extra:
        raise InvalidClaim(f"claim '{extra[0]}' is not allowed")
    kind = _validate_kind(payload["token_use"])
    project = _validate_project(payload["project"])
    if kind.project_bound != (project is not None):
        need = "a project name" if kind.project_bound else "null"
        raise _bad("project", f"{need} for a {kind.value} token")
    return Claims(
        iss=_nonempty_str("iss", payload["iss"]), aud=_nonempty_str("aud", payload["aud"]),
        sub=_nonempty_str("sub", payload["sub"]), iat=_int_time("iat", payload["iat"]),
        exp=_int_time("exp", payload["exp"]), jti=_nonempty_str("jti", payload["jti"]),
        kind=kind, project=project, scope=_validate_scope(payload["scope"]),
    )


def _segment_json(segment: str) -> Any:
    """One base64url segment as JSON; RepeatedName for a repeated member name (RFC 7515 lets a
    parser keep the last; another verifier keeping the first would read a different token, so
    we refuse instead of choosing), else ValueError."""
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
    return json_without_repeats(data)


def unverified_object(segment: str, what: Literal["header", "payload"]) -> dict[str, Any]:
    """A token's header or payload segment, read before any signature check. Parsed here rather
    than by pyjwt, which would reject some headers (crit, a non-string kid) under a generic error
    before we can name the reason."""
    try:
        value = _segment_json(segment)
    except RepeatedName as repeated:
        repeats = InvalidHeader if what == "header" else InvalidClaim
        raise repeats(f"{what} member '{repeated}' is repeated") from None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise MalformedToken(f"the token {what} is not a base64url-encoded JSON object")
    return value


def verified_payload(token: str, key: Any, algorithm: str) -> dict[str, Any]:
    """The payload of a token whose signature verifies under ``key`` with ``algorithm``, parsed
    once; a repeated claim name is refused (pyjwt would keep the last, another verifier the
    first)."""
    try:
        signed = _JWS.decode_complete(token, key, algorithms=[algorithm])
    except jwt.InvalidSignatureError:
        raise InvalidSignature("the token signature does not verify") from None
    except jwt.InvalidTokenError:
        raise MalformedToken("the token is not a signed JWS") from None
    try:
        payload = json_without_repeats(signed["payload"])
    except RepeatedName as repeated:
        raise InvalidClaim(f"claim '{repeated}' is repeated") from None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise MalformedToken("the token payload is not a JSON object")
    return payload


def _checked_header(token: str) -> str:
    """Validates the unverified header and returns its kid."""
    header = unverified_object(token.split(".", 1)[0], "header")
    if header.get("alg") != ALGORITHM:
        raise InvalidAlgorithm(f"only {ALGORITHM} tokens are accepted")
    extra = sorted(set(header) - ALLOWED_HEADERS)
    if extra:
        raise InvalidHeader(f"header parameter '{extra[0]}' is not allowed")
    if "typ" in header and header["typ"] != "JWT":
        raise InvalidHeader("header 'typ' must be \"JWT\"")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidHeader("header 'kid' is required and must be a string")
    return kid


class TokenService:
    """Issues and verifies tokens. ``lifetime_caps`` is read on every call, so a live mapping (see
    ``policy.LifetimeCaps``) makes a policy reload take effect at once; a kind without a cap can be
    neither issued nor accepted."""

    def __init__(
        self, issuer: str, keyring: KeySource, *, clock: Clock, leeway_s: float = 30,
        lifetime_caps: Mapping[TokenKind, int],
    ) -> None:
        self.issuer = issuer
        self._keyring = keyring
        self._clock = clock
        self._leeway = leeway_s
        self._caps = lifetime_caps

    def _cap(self, kind: TokenKind) -> int | None:
        cap = self._caps.get(kind)
        return cap if isinstance(cap, int) and cap > 0 else None

    def issue(
        self, *, kind: TokenKind, subject: str, project: str | None, scope: Iterable[str],
        ttl_s: int, audience: str,
    ) -> tuple[str, Claims]:
        """Signs a new token with the newest key; a bad argument raises InvalidRequest naming it."""
        cap = self._cap(kind)
        if cap is None:
            raise InvalidRequest(f"policy sets no lifetime for {kind.value} tokens")
        if type(ttl_s) is not int or not 0 < ttl_s <= cap:
            raise InvalidRequest(f"ttl must be an integer from 1 to {cap} seconds "
                             f"for {kind.value} tokens")
        scopes = frozenset(scope)
        if any(not isinstance(name, str) or not SCOPE_TOKEN.match(name) for name in scopes):
            raise InvalidRequest("scope must be a set of scope names such as 'sessions:write'")
        now = int(self._clock())
        claims = Claims(
            iss=self.issuer, aud=audience, sub=subject, iat=now, exp=now + ttl_s,
            # Hex, never a leading "-": a jti is typed on command lines (dsn admin tokens revoke).
            jti=secrets.token_hex(16), kind=kind, project=project, scope=scopes,
        )
        try:  # the issuer holds itself to the verifier's rules
            typed_claims(claims.to_payload())
        except TokenError as error:
            raise InvalidRequest(error.detail) from None
        kid, key = self._keyring.signing_key()
        token = jwt.encode(claims.to_payload(), key, algorithm=ALGORITHM,
                           headers={"kid": kid, "typ": "JWT"})
        return token, claims

    async def found_key(self, token: str) -> bool:
        """Whether the key ``token`` names, unknown to ``verify``, is published after all: the
        key source looks again (rate-limited). Call only after ``verify`` raised UnknownKey."""
        return await self._keyring.lookup(_checked_header(token)) is not None

    def verify(self, token: str, surface: Surface) -> Claims:
        """Pure verification; raises a TokenError subclass naming the reason."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise MalformedToken(f"a token is a string of at most {MAX_TOKEN_BYTES} bytes")
        if not _JWS_SHAPE.match(token):
            raise MalformedToken("a token is three base64url segments joined by dots")
        kid = _checked_header(token)
        key = self._keyring.public_key(kid)
        if key is None:
            raise UnknownKey("the token's key id is not published")
        claims = typed_claims(verified_payload(token, key, ALGORITHM))
        self.check_values(claims, surface)
        return claims

    def check_values(self, claims: Claims, surface: Surface) -> None:
        if claims.iss != self.issuer:
            raise InvalidIssuer("the token was issued by another issuer")
        if claims.aud != surface.audience:
            raise InvalidAudience("the token is for another audience")
        if claims.kind not in surface.kinds:
            raise WrongKind(f"a {claims.kind.value} token is not accepted here")
        cap = self._cap(claims.kind)
        if claims.exp <= claims.iat or cap is None or claims.exp - claims.iat > cap:
            raise LifetimeTooLong("the token's lifetime exceeds the policy cap")
        now = self._clock()
        if now >= claims.exp + self._leeway:
            raise ExpiredToken("the token has expired")
        if claims.iat > now + self._leeway:
            raise ImmatureToken("the token is not valid yet")


# Kinds minted by token exchange from a project token (their store record names the parent).
EXCHANGED_KINDS = frozenset({TokenKind.SESSION, TokenKind.CONSUMER})


class RevocationStore(Protocol):
    """What the Authenticator reads of the store (``controlplane.store.tokens.Revocations``)."""

    async def is_revoked(self, jti: str, now: float) -> bool: ...

    async def get_project(self, name: str) -> Any: ...

    async def get_token(self, jti: str) -> Any: ...

    async def is_active_admin(self, name: str) -> bool: ...


class Authenticator:
    """verify() plus the store-backed checks; store failures propagate as Unavailable (fail
    closed)."""

    def __init__(self, tokens: TokenService, store: RevocationStore, clock: Clock) -> None:
        self._tokens = tokens
        self._store = store
        self._clock = clock

    async def authenticate(self, token: str, surface: Surface) -> Claims:
        try:
            claims = self._tokens.verify(token, surface)
        except UnknownKey:
            # Another replica may have published the key since this one last read them.
            if not await self._tokens.found_key(token):
                raise
            claims = self._tokens.verify(token, surface)
        await self._check_store(claims)
        return claims

    async def recheck(self, claims: Claims, surface: Surface) -> Claims:
        """Claims verified earlier (a console session holds those of its token), checked again as
        if the token came with this request: surface, lifetime, clock, revocation, project,
        admin."""
        self._tokens.check_values(claims, surface)
        await self._check_store(claims)
        return claims

    async def _check_store(self, claims: Claims) -> None:
        if await self._store.is_revoked(claims.jti, self._clock()):
            raise RevokedToken("the token has been revoked")
        if claims.kind in EXCHANGED_KINDS:
            await self._check_parent(claims.jti)
        if claims.project is not None:
            await self._check_project(claims.project, claims.iat)
        if claims.kind is TokenKind.ADMIN and not await self._store.is_active_admin(claims.sub):
            # Removal revokes the admin's tokens too; this also holds for one issued meanwhile.
            raise UnknownAdmin("the token's admin has been removed or does not exist")

    async def _check_parent(self, jti: str) -> None:
        # A token obtained by exchange dies with the project token it came from.
        record = await self._store.get_token(jti)
        parent = getattr(record, "parent_jti", None)
        if parent is not None and await self._store.is_revoked(parent, self._clock()):
            raise RevokedToken("the token it was exchanged from has been revoked")

    async def _check_project(self, name: str, issued_at: int) -> None:
        project = await self._store.get_project(name)
        if project is None:
            raise UnknownProject("the token's project no longer exists")
        if project.not_before is not None and issued_at < project.not_before:
            raise RevokedToken("the token predates the project's not_before")
