"""Request and response bodies of the REST API (SPEC §4), as pydantic models.

Requests forbid unknown fields and are strict (no "5" for 5): a typo is a 400 naming the field,
never a silently ignored setting. Times are ISO 8601 with a zone on the wire (UTC on output); token
lifetimes (``ttl``) are whole seconds. The same models feed the OpenAPI document.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints


class RepeatedName(ValueError):
    """A JSON object naming one member twice; the exception's text is that name."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise RepeatedName(min(name for name in names if names.count(name) > 1))
    return dict(pairs)


def json_without_repeats(data: bytes | str) -> Any:
    """Parse JSON, refusing repeated member names (RepeatedName): parsers disagree on which of
    them counts, so a document with any means different things to different readers. Anything
    else unparsable, too deep included, is a ValueError."""
    try:
        return json.loads(data, object_pairs_hook=_unique_members)
    except RecursionError:
        raise ValueError("nested too deeply") from None

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SCOPE_PATTERN = r"^[A-Za-z0-9:._/-]+( [A-Za-z0-9:._/-]+)*$"
MAX_TTL_S = 10 * 365 * 86400  # a sanity bound; policy caps are far below it

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Scope = Annotated[str, StringConstraints(pattern=SCOPE_PATTERN, max_length=1024)]
Subject = Annotated[str, StringConstraints(min_length=1, max_length=200,
                                           pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")]
Ttl = Annotated[int, Field(ge=1, le=MAX_TTL_S)]
QuotaValue = Annotated[int, Field(ge=0, le=1_000_000_000)]


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class QueryParams(BaseModel):
    """Query strings are text, so these convert ("10" -> 10) but still refuse unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ResponseBody(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- requests ------------------------------------------------------------------------------------

class ProjectCreate(RequestBody):
    name: Name
    allowed_templates: list[Name] = Field(default_factory=list, max_length=256)
    quotas: dict[Name, QuotaValue] = Field(default_factory=dict, max_length=64)


class ProjectUpdate(RequestBody):
    """Only the fields present change. ``not_before`` invalidates every older token of the
    project."""

    allowed_templates: list[Name] | None = Field(default=None, max_length=256)
    quotas: dict[Name, QuotaValue] | None = Field(default=None, max_length=64)
    not_before: AwareDatetime | None = None


class TokenIssue(RequestBody):
    """A project token for ``subject``. ``scope`` defaults to every scope the policy grants project
    tokens; ``ttl`` defaults to, and is capped by, the policy's lifetime for the kind."""

    subject: Subject
    scope: Scope | None = None
    ttl: Ttl | None = None


class TokenExchange(RequestBody):
    """RFC 8693-style exchange of the caller's project token for a narrower, short-lived token.

    ``scope`` must be a subset of the project token's scope (default: all of it); ``audience``
    defaults to the gateway for session tokens and to this API for consumer tokens.
    """

    kind: Literal["session", "consumer"]
    audience: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    scope: Scope | None = None
    ttl: Ttl | None = None


class AdminCreate(RequestBody):
    """A new admin (or a removed one enabled again) and its first token; ``ttl`` defaults to,
    and is capped by, the policy's lifetime for admin tokens."""

    name: Name
    ttl: Ttl | None = None


class AdminTokenIssue(RequestBody):
    """A new token for an active admin. ``revoke_others`` revokes every other token of the admin
    in the same transaction (a rotation)."""

    ttl: Ttl | None = None
    revoke_others: bool = False


FormText = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class TokenExchangeForm(RequestBody):
    """RFC 8693 token exchange, form-encoded. ``subject_token`` is the credential: a DSN project
    token (``subject_token_type`` ``urn:ietf:params:oauth:token-type:access_token`` or
    ``urn:dsn:params:token-type:project``), exchanged for ``urn:dsn:params:token-type:session``
    (default) or ``...:consumer``; or an outside identity token
    (``urn:ietf:params:oauth:token-type:id_token`` or ``...:jwt``) of a trusted issuer, exchanged
    for ``urn:dsn:params:token-type:project``. ``scope`` and ``audience`` narrow the new token;
    ``project`` (an extension) picks the project where an identity maps to several."""

    grant_type: FormText
    subject_token: Annotated[str, StringConstraints(min_length=1, max_length=16 * 1024)]
    subject_token_type: FormText
    requested_token_type: FormText | None = None
    scope: Scope | None = None
    audience: FormText | None = None
    resource: FormText | None = None
    actor_token: Annotated[str, StringConstraints(max_length=16 * 1024)] | None = None
    actor_token_type: FormText | None = None
    project: Name | None = None


Seq = Annotated[int, Field(ge=0, le=2**63 - 1)]  # SQLite INTEGER range


class AuditQuery(QueryParams):
    """Records with ``after`` < seq < ``before``, a principal containing ``principal`` (any case;
    "via console" finds the console's), exactly ``action`` and ``decision``, a time in [``since``,
    ``until``); ``order`` ``desc`` lists the newest first (``before`` then pages back in time)."""

    after: Seq = 0
    before: Seq | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    principal: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    action: Annotated[str, StringConstraints(pattern=r"^[a-z*][a-z_:*]{0,63}$")] | None = None
    decision: Literal["allow", "deny"] | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    order: Literal["asc", "desc"] = "asc"


# --- responses -----------------------------------------------------------------------------------

class FieldError(ResponseBody):
    field: str
    message: str
    line: int | None = None  # a template's errors: the line of the template file at fault


class Problem(ResponseBody):
    """RFC 9457 problem details, always with the request id to quote to an admin."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    request_id: str
    errors: list[FieldError] | None = None


class ProjectOut(ResponseBody):
    name: str
    allowed_templates: list[str]
    quotas: dict[str, int]
    not_before: datetime | None
    created_at: datetime


class ProjectList(ResponseBody):
    items: list[ProjectOut]


class TokenInfo(ResponseBody):
    """A token's metadata; the token itself is never stored, so it can never be listed."""

    jti: str
    project: str | None
    kind: str
    subject: str
    scope: str
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    parent_jti: str | None


class TokenList(ResponseBody):
    items: list[TokenInfo]


class IssuedToken(ResponseBody):
    """A freshly signed token: shown in this response only."""

    token: str
    token_type: Literal["Bearer"] = "Bearer"
    jti: str
    kind: str
    project: str | None
    subject: str
    scope: str
    audience: str
    issued_at: datetime
    expires_at: datetime
    expires_in: int


class AdminOut(ResponseBody):
    """An admin; ``live_tokens`` and ``last_expiry`` (when its last live token expires) say when
    it would be locked out without a new token."""

    name: str
    active: bool
    created_at: datetime
    created_by: str
    removed_at: datetime | None
    live_tokens: int
    last_expiry: datetime | None


class AdminList(ResponseBody):
    items: list[AdminOut]


class Whoami(ResponseBody):
    """The caller's own token as the service accepted it: who, which token, until when."""

    kind: str
    subject: str
    jti: str
    scope: str
    issued_at: datetime
    expires_at: datetime
    expires_in: int


class ConsoleSession(ResponseBody):
    """A web-console sign-in: who it acts as, until when, and the CSRF token its page sends with
    every state change."""

    kind: str
    subject: str
    project: str | None
    scope: str
    expires_at: datetime
    csrf_token: str


class TokenResponse(ResponseBody):
    """RFC 8693 §2.2.1: the answer to a form-encoded token exchange; ``jti`` and ``project`` name
    the new token for revocation and listing."""

    access_token: str
    issued_token_type: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int
    scope: str
    jti: str
    project: str


class OAuthError(ResponseBody):
    """RFC 6749 §5.2: how the OAuth form of the token endpoint refuses."""

    error: Literal["invalid_request", "invalid_scope", "invalid_target", "unsupported_grant_type",
                   "temporarily_unavailable", "server_error"]
    error_description: str


class ServerMetadata(ResponseBody):
    """RFC 8414 authorization server metadata. ``issuer`` is the service's public URL;
    ``dsn_token_issuer`` is the ``iss`` its tokens carry (a stable name, not the URL)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    issuer: str
    token_endpoint: str
    jwks_uri: str
    grant_types_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    scopes_supported: list[str]
    response_types_supported: list[str]
    dsn_token_issuer: str
    dsn_subject_token_types_supported: list[str]
    dsn_requested_token_types_supported: list[str]
    service_documentation: str | None = None


class Jwk(ResponseBody):
    model_config = ConfigDict(frozen=True, extra="allow")

    kty: Literal["OKP"]
    crv: Literal["Ed25519"]
    x: str
    kid: str
    alg: Literal["EdDSA"] = "EdDSA"
    use: Literal["sig"] = "sig"


class Jwks(ResponseBody):
    keys: list[Jwk]


class KeyRotation(ResponseBody):
    kid: str
    published: list[str]
    retired: list[str]


class PolicySummary(ResponseBody):
    """The active policy set as loaded (``source`` files and their parsed content); ``digest``
    (SHA-256 of its canonical form) tells one version from another."""

    sources: list[str]
    policy: dict[str, Any]
    digest: str


class PolicyReload(ResponseBody):
    ok: bool
    problems: list[str]
    sources: list[str]


class AuditRecordOut(ResponseBody):
    seq: int
    ts: datetime
    principal: str
    action: str
    resource: str
    decision: Literal["allow", "deny"]
    rule: str
    request_id: str
    prev_hash: str
    hash: str
    count: int  # decisions it stands for: more than 1 for a summary of repeated denials


class AuditList(ResponseBody):
    """``next_after``: the highest seq listed (``after`` if none), to ask for newer records;
    ``next_before``: the lowest (``before`` if none), to ask for older ones."""

    items: list[AuditRecordOut]
    next_after: int
    next_before: int | None


class AuditVerification(ResponseBody):
    ok: bool
    records: int
    first_bad_seq: int | None
    problem: str | None
    checkpoints: int  # signed checkpoints the chain was checked against


class GatewaySessionOut(ResponseBody):
    """One session's series on a gateway's metrics page (docs/observability.md, "Gateway
    metrics"): totals since the gateway started, and gauges (``scans_open``, ``consumers``,
    ``consumers_connected``, ``backpressure_waiting_seconds``) as of the scrape; an ended session
    keeps its totals, its gauges read 0. ``project`` is None for a series the store knows no
    session of (the folded ``(ended)`` one)."""

    session: str
    project: str | None
    messages: float = 0
    bytes: float = 0
    spooled_messages: float = 0
    spooled_bytes: float = 0
    spool_files: float = 0
    scans_open: float = 0
    scans_interrupted: float = 0
    scans_idle_closed: float = 0
    consumers: float = 0
    consumers_connected: float = 0
    backpressure_waits: float = 0
    backpressure_seconds: float = 0
    backpressure_waiting_seconds: float = 0
    drops: dict[str, float] = Field(default_factory=dict)


class GatewayOut(ResponseBody):
    """A configured gateway: ``up`` with its sessions' counters, or down with ``reason``."""

    url: str
    up: bool
    reason: str | None
    scraped_at: datetime
    sessions: list[GatewaySessionOut]


class RegisteredGatewayOut(ResponseBody):
    """A gateway that registered itself (``controlplane.placement``): where producers reach it, its
    capacity, the open sessions placed on it, and whether it is ``live`` (its last registration
    within ``gateway_timeout_s``)."""

    # Built from placement.GatewayRecord's fields (gateways.registered_out): a field added to the
    # record and not here is refused, one added here and not there is missing; either fails at once.
    model_config = ConfigDict(extra="forbid")

    name: str
    endpoint: str
    receipts_endpoint: str
    plain_endpoint: str | None
    server_key: str
    capacity: int
    sessions: int
    live: bool
    registered_at: datetime
    last_seen: datetime


class GatewayList(ResponseBody):
    """The configured gateways' counters (``items``) and, for an admin, the registered gateways
    sessions are placed on (``registered``; empty for a project token)."""

    items: list[GatewayOut]
    registered: list[RegisteredGatewayOut] = Field(default_factory=list)


class Health(ResponseBody):
    status: Literal["ok"]
