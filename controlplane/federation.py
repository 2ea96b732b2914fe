"""Federated identity: tokens of trusted outside OpenID Connect issuers, verified here and mapped
to a project by the admin's rules, so a facility user obtains a project token without an admin.

The policy's ``federation`` section (``FederationPolicy``) names each trusted issuer: its ``iss``,
the ``audience`` its tokens must carry (our client id there), its JWKS URL, the algorithms it may
sign with (pinned: asymmetric only, never ``none`` or HMAC), a clock leeway, and rules mapping
claims (``email`` pattern, a claim that equals or contains a value) to a project and scopes.

``Federation.verify`` checks an outside token: size and shape, the header (pinned ``alg``, a
``kid``, nothing that names its own key), the issuer it claims (configured, else refused), the key
(from the issuer's JWKS, cached), the signature, then ``iss``, ``aud``, ``exp``, ``nbf``, ``iat``
and ``sub`` against the service's clock. ``map_identity`` applies the rules.

The JWKS cache: keys are kept ``max_age`` seconds; a kid it does not hold is fetched again at most
once per ``refetch_interval`` (a stream of made-up kids cannot make us hammer the issuer); when the
issuer cannot be reached, the keys last fetched are used for up to ``stale_for`` seconds past their
age (stale-if-error), and after that, or when no key was ever fetched, every token is refused.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controlplane.errors import (
    ExpiredToken,
    ImmatureToken,
    InvalidAlgorithm,
    InvalidAudience,
    InvalidClaim,
    InvalidHeader,
    InvalidIssuer,
    KeysUnavailable,
    MalformedToken,
    MissingClaim,
    UnknownKey,
)
from controlplane.schemas import json_without_repeats
from controlplane.tokens import unverified_object, verified_payload

MAX_TOKEN_BYTES: Final = 16 * 1024
MAX_JWKS_BYTES: Final = 256 * 1024
FETCH_TIMEOUT_S: Final = 5.0
# Asymmetric algorithms only: an HMAC "key" from a JWKS would be public, and none is no signature.
Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                    "ES512", "EdDSA"]
ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
_JWS_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SUBJECT = re.compile(r"^[\x21-\x7e]{1,128}$")
_LOOPBACK_NAMES = frozenset({"localhost"})


# --- the policy section --------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ClaimCondition(_Strict):
    """``name`` holds ``equals`` (a string claim) or ``contains`` (a list-of-strings claim)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
    equals: str | None = Field(default=None, min_length=1, max_length=256)
    contains: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_test(self) -> ClaimCondition:
        if (self.equals is None) == (self.contains is None):
            raise ValueError("a claim condition needs exactly one of equals, contains")
        return self

    def holds(self, claims: dict[str, Any]) -> bool:
        value = claims.get(self.name)
        if self.equals is not None:
            return isinstance(value, str) and value == self.equals
        return isinstance(value, list) and self.contains in [v for v in value
                                                             if isinstance(v, str)]


class MappingRule(_Strict):
    """Every condition given must hold (at least one is required): ``email`` (an fnmatch pattern
    on a verified ``email`` claim) and ``claims``. The identity then gets a project token of
    ``project`` carrying ``scopes``."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    project: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    scopes: list[str] = Field(min_length=1)
    email: str | None = Field(default=None, min_length=1, max_length=256)
    claims: list[ClaimCondition] = []

    @model_validator(mode="after")
    def _some_condition(self) -> MappingRule:
        if self.email is None and not self.claims:
            raise ValueError("a rule needs a condition (email or claims): none would let every "
                             "identity of the issuer in")
        return self

    def matches(self, claims: dict[str, Any]) -> bool:
        if self.email is not None:
            email = claims.get("email")
            # An unverified address is anyone's to type in; only a verified one (or one the
            # issuer does not qualify) may match.
            if not isinstance(email, str) or claims.get("email_verified") is False:
                return False
            if not fnmatch.fnmatchcase(email.lower(), self.email.lower()):
                return False
        return all(condition.holds(claims) for condition in self.claims)


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TrustedIssuer(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    issuer: str = Field(min_length=1, max_length=512)
    audience: str = Field(min_length=1, max_length=256)
    jwks_url: str = Field(min_length=1, max_length=1024)
    algorithms: list[Algorithm] = Field(min_length=1)
    leeway: int = Field(default=60, ge=0, le=300)
    max_age: int = Field(default=300, ge=1, le=86400)
    stale_for: int = Field(default=3600, ge=0, le=7 * 86400)
    refetch_interval: int = Field(default=30, ge=1, le=3600)
    rules: list[MappingRule] = Field(min_length=1)

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, value: str) -> str:
        parts = urlsplit(value)
        if not parts.hostname or parts.scheme not in ("https", "http"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(f"{value!r}: keys are fetched over https (http only on loopback)")
        return value


class FederationPolicy(_Strict):
    """``max_ttl``: the longest life (seconds) of a project token issued to an outside identity
    (further capped by the project kind's own cap)."""

    max_ttl: int = Field(ge=60, le=30 * 86400)
    issuers: list[TrustedIssuer] = []

    @field_validator("max_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        from controlplane.policy import parse_duration  # the one duration syntax of the policy
        return parse_duration(value)

    def problems(self, project_scopes: frozenset[str]) -> list[str]:
        """Cross-checks: unique names and issuers, rule ids, scopes a project token may carry."""
        found: list[str] = []
        seen_names, seen_issuers = set(), set()
        for index, trusted in enumerate(self.issuers):
            where = f"federation.issuers[{index}]"
            if trusted.name in seen_names or trusted.issuer in seen_issuers:
                found.append(f"{where}: issuer {trusted.name!r} ({trusted.issuer}) is listed twice")
            seen_names.add(trusted.name)
            seen_issuers.add(trusted.issuer)
            ids = [rule.id for rule in trusted.rules]
            found += [f"{where}.rules: duplicate rule id {rule_id!r}"
                      for rule_id in sorted({i for i in ids if ids.count(i) > 1})]
            for r, rule in enumerate(trusted.rules):
                beyond = sorted(set(rule.scopes) - project_scopes)
                if beyond:
                    found.append(f"{where}.rules[{r}].scopes: {beyond} are beyond what project "
                                 "tokens may carry")
        return found


# --- keys ----------------------------------------------------------------------------------------

Fetch = Callable[[str], Awaitable[bytes]]
Clock = Callable[[], float]


@dataclass
class _Keys:
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float | None = None  # of the keys held
    attempted_at: float | None = None  # of the last fetch, good or bad


def parse_jwks(raw: bytes, algorithms: Sequence[str]) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by kid, only those usable with ``algorithms``."""
    try:
        document = json_without_repeats(raw)
    except ValueError:
        raise KeysUnavailable("the issuer's JWKS is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeysUnavailable("the issuer's JWKS has no key list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:  # never a private key
            continue
        if entry.get("alg") is not None and entry["alg"] not in algorithms:
            continue
        try:
            keys[entry["kid"]] = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue  # a key of a type we do not verify with: never usable here
    return keys


class JwksCache:
    """One issuer's keys, fetched on demand (see the module docstring for the bounds)."""

    def __init__(self, trusted: TrustedIssuer, fetch: Fetch, clock: Clock) -> None:
        self._trusted = trusted
        self._fetch = fetch
        self._clock = clock
        self._state = _Keys()
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK:
        async with self._lock:
            now = self._clock()
            state = self._state
            fresh = state.fetched_at is not None and now - state.fetched_at < self._trusted.max_age
            if not fresh or (kid not in state.keys and self._may_refetch(now)):
                await self._refresh(now)
            usable = self._usable(now)
            if kid not in usable:
                raise UnknownKey("the token's key id is not among the issuer's published keys")
            return usable[kid]

    def _may_refetch(self, now: float) -> bool:
        attempted = self._state.attempted_at
        return attempted is None or now - attempted >= self._trusted.refetch_interval

    async def _refresh(self, now: float) -> None:
        if not self._may_refetch(now) and self._state.fetched_at is not None:
            return  # failed a moment ago: do not ask again yet, use what is held
        self._state.attempted_at = now
        try:
            keys = parse_jwks(await self._fetch(self._trusted.jwks_url), self._trusted.algorithms)
        except KeysUnavailable:
            return  # stale-if-error: _usable decides whether what is held may still serve
        self._state.keys, self._state.fetched_at = keys, now

    def _usable(self, now: float) -> dict[str, jwt.PyJWK]:
        fetched = self._state.fetched_at
        if fetched is None:
            raise KeysUnavailable("the issuer's keys could not be fetched")
        if now - fetched > self._trusted.max_age + self._trusted.stale_for:
            raise KeysUnavailable("the issuer's keys could not be fetched again and those held "
                                  "are too old to trust")
        return self._state.keys


async def http_fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    """The body at ``url``: 200, JSON, at most MAX_JWKS_BYTES, within FETCH_TIMEOUT_S; anything
    else is KeysUnavailable."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT_S), session.get(
                url, allow_redirects=False, headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise KeysUnavailable(f"the issuer's JWKS answered {response.status}")
            raw = await response.content.read(MAX_JWKS_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError, OSError):
        raise KeysUnavailable("the issuer's JWKS cannot be reached") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise KeysUnavailable("the issuer's JWKS is too large")
    return raw


# --- verification and mapping --------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """A verified outside identity: the issuer entry that vouched for it and its claims."""

    issuer: TrustedIssuer
    subject: str
    claims: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.issuer.name}:{self.subject}"


@dataclass(frozen=True)
class Mapped:
    identity: Identity
    rule: MappingRule


def _int_claim(claims: dict[str, Any], name: str, required: bool) -> int | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise MissingClaim(f"claim '{name}' is required")
    if type(value) is not int:
        raise InvalidClaim(f"claim '{name}' must be an integer")
    return value


class Federation:
    """Verifies outside tokens against the active policy's issuers, with a key cache per
    issuer and JWKS URL (a policy reload that changes either starts a new cache)."""

    def __init__(self, fetch: Fetch, clock: Clock) -> None:
        self._fetch = fetch
        self._clock = clock
        self._caches: dict[tuple[str, str, tuple[str, ...]], JwksCache] = {}

    def _cache(self, trusted: TrustedIssuer) -> JwksCache:
        key = (trusted.issuer, trusted.jwks_url, tuple(trusted.algorithms))
        if key not in self._caches:
            self._caches[key] = JwksCache(trusted, self._fetch, self._clock)
        return self._caches[key]

    async def verify(self, token: str, policy: FederationPolicy | None) -> Identity:
        if len(token) > MAX_TOKEN_BYTES or not _JWS_SHAPE.match(token):
            raise MalformedToken(f"an identity token is a JWS of at most {MAX_TOKEN_BYTES} bytes")
        header_segment, payload_segment, _ = token.split(".")
        header = unverified_object(header_segment, "header")
        unverified = unverified_object(payload_segment, "payload")
        trusted = self._trusted(unverified.get("iss"), policy)
        alg, kid = self._checked_header(header, trusted)
        key = await self._cache(trusted).key(kid)
        claims = self._signed_claims(token, key, alg)
        return Identity(trusted, self._checked_claims(claims, trusted), claims)

    @staticmethod
    def _trusted(iss: Any, policy: FederationPolicy | None) -> TrustedIssuer:
        for trusted in policy.issuers if policy is not None else []:
            if iss == trusted.issuer:
                return trusted
        raise InvalidIssuer("the token's issuer is not trusted here")

    @staticmethod
    def _checked_header(header: dict[str, Any], trusted: TrustedIssuer) -> tuple[str, str]:
        alg = header.get("alg")
        if alg not in trusted.algorithms:
            raise InvalidAlgorithm(f"the issuer {trusted.name!r} signs with "
                                   f"{', '.join(trusted.algorithms)} only")
        extra = sorted(set(header) - ALLOWED_HEADERS)
        if extra:
            raise InvalidHeader(f"header parameter '{extra[0]}' is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise InvalidHeader("header 'kid' is required and must be a string")
        return str(alg), kid

    @staticmethod
    def _signed_claims(token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        if key.algorithm_name != alg and not (alg.startswith("PS") and key.key_type == "RSA"):
            raise InvalidAlgorithm("the token's algorithm does not fit the key it names")
        return verified_payload(token, key.key, alg)

    def _checked_claims(self, claims: dict[str, Any], trusted: TrustedIssuer) -> str:
        if claims.get("iss") != trusted.issuer:
            raise InvalidIssuer("the token was issued by another issuer")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if trusted.audience not in audiences:
            raise InvalidAudience("the token is for another audience")
        now, leeway = self._clock(), trusted.leeway
        exp, iat = _int_claim(claims, "exp", True), _int_claim(claims, "iat", True)
        nbf = _int_claim(claims, "nbf", False)
        if exp is not None and now >= exp + leeway:
            raise ExpiredToken("the identity token has expired")
        if (iat is not None and iat > now + leeway) or (nbf is not None and nbf > now + leeway):
            raise ImmatureToken("the identity token is not valid yet")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not _SUBJECT.match(subject):
            raise InvalidClaim("claim 'sub' must be 1 to 128 printable characters")
        return subject


def map_identity(identity: Identity, project: str | None) -> list[MappingRule]:
    """The rules that let ``identity`` in, in order; only those for ``project`` if one is named."""
    return [rule for rule in identity.issuer.rules if rule.matches(identity.claims)
            and (project is None or rule.project == project)]


FEDERATION: Final = web.AppKey("federation", Federation)


def federation_ctx(clock: Clock) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's Federation, with its HTTP client session, for the app's lifetime."""
    async def open_federation(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(raise_for_status=False) as session:
            async def fetch(url: str) -> bytes:
                return await http_fetch(session, url)
            app[FEDERATION] = Federation(fetch, clock)
            yield
    return open_federation
