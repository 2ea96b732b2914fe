"""The token endpoint and the service's OAuth metadata.

``POST /api/v1/token`` speaks two forms:

- **RFC 8693** (``application/x-www-form-urlencoded``): ``grant_type`` token-exchange, the
  credential in ``subject_token``, answered with ``access_token``, ``issued_token_type``,
  ``token_type``, ``expires_in`` and ``scope``; refusals are RFC 6749 §5.2 errors (``error``,
  ``error_description``, ``Cache-Control: no-store``).
- **JSON** (``{"kind": ...}`` with the project token as Bearer), kept for existing clients.

The RFC 8693 form also takes an outside identity token (``id_token`` or ``jwt`` subject token type)
of an issuer the policy's ``federation`` section trusts: verified by ``controlplane.federation``,
mapped by the admin's rules to a project and scopes, and answered with a project token (subject
``ISSUER-NAME:SUB``), so a facility user needs no admin to obtain one. Its decision is the action
``token:federate`` for the principal kind ``federated``; an identity no rule maps is refused and
audited under its name with rule ``federation:no-matching-rule``.

Both go through the same route declaration: the credential is found and verified by
``exchange_credentials`` inside the authorization middleware, so rate limits, the policy decision
and its audit record are the same whichever form a client speaks. The new token is never wider or
longer-lived than its parent, and counts against the project's token quota.

``GET /.well-known/oauth-authorization-server`` publishes RFC 8414 metadata.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web
from pydantic import ValidationError

from controlplane import schemas as s
from controlplane.errors import (
    ExpiredToken,
    InvalidClaim,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnmappedIdentity,
    UnsupportedGrantType,
)
from controlplane.federation import FEDERATION, Mapped, map_identity
from controlplane.middlewares import (
    CALLER,
    OAUTH_ERRORS,
    SERVICES,
    Caller,
    RouteSpec,
    Services,
    bearer_token,
    token_caller,
)
from controlplane.policy import FEDERATED, SCOPES, Principal, Resource
from controlplane.tokens import Claims, Surface, TokenKind
from controlplane.views import (
    PROJECT_ONLY,
    check_not_before,
    existing_project,
    parse_body,
    remember_token,
    reply,
    validation_errors,
)

TOKEN_PATH: Final = "/api/v1/token"
METADATA_PATH: Final = "/.well-known/oauth-authorization-server"
GRANT_TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
FORM: Final = "application/x-www-form-urlencoded"
# Token types (RFC 8693 §3), ours under urn:dsn:params:token-type.
ACCESS_TOKEN: Final = "urn:ietf:params:oauth:token-type:access_token"
DSN_TOKEN_TYPE: Final = "urn:dsn:params:token-type:"
PROJECT_TOKEN: Final = DSN_TOKEN_TYPE + "project"
SESSION_TOKEN: Final = DSN_TOKEN_TYPE + "session"
CONSUMER_TOKEN: Final = DSN_TOKEN_TYPE + "consumer"
DSN_SUBJECT_TYPES: Final = (ACCESS_TOKEN, PROJECT_TOKEN)
ID_TOKEN: Final = "urn:ietf:params:oauth:token-type:id_token"
JWT: Final = "urn:ietf:params:oauth:token-type:jwt"
FEDERATED_SUBJECT_TYPES: Final = (ID_TOKEN, JWT)
NO_MATCHING_RULE: Final = "federation:no-matching-rule"
REQUESTED_TYPES: Final = {SESSION_TOKEN: TokenKind.SESSION, CONSUMER_TOKEN: TokenKind.CONSUMER}


@dataclass(frozen=True)
class Exchange:
    """What a token request asks for, read from either form: the kind, and the narrowing the
    caller wants (None: the most the parent and the policy allow)."""

    kind: TokenKind
    scope: str | None
    audience: str | None
    ttl: int | None
    oauth: bool  # the RFC 8693 form: answer with TokenResponse
    federated: Mapped | None = None  # an outside identity and the rule that let it in


EXCHANGE: Final = web.RequestKey("exchange", Exchange)


# --- reading the request -------------------------------------------------------------------------

async def read_form(request: web.Request) -> dict[str, str]:
    """The form-encoded body as one value per name: bounded like every body, each name at most
    once (RFC 6749 §3.2), valid UTF-8."""
    settings = request.app[SERVICES].settings
    limit = settings.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive within {settings.body_timeout_s:g} s") from None
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw),
                          errors="strict", max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the request body is not a form (name=value&...) in UTF-8") from None
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidRequest(f"the form names '{repeated[0]}' more than once",
                             errors=[{"field": repeated[0], "message": "repeated"}])
    # An empty value is an absent parameter (RFC 6749 §3.1).
    return {name: value for name, value in pairs if value != ""}


def _parsed_form(form: dict[str, str]) -> s.TokenExchangeForm:
    try:
        return s.TokenExchangeForm.model_validate(form)
    except ValidationError as exc:
        raise InvalidRequest("the token request is invalid",
                             errors=validation_errors(exc)) from None


def _requested_kind(body: s.TokenExchangeForm) -> TokenKind:
    requested = body.requested_token_type or SESSION_TOKEN
    if requested not in REQUESTED_TYPES:
        raise InvalidRequest(
            f"requested_token_type must be one of {', '.join(REQUESTED_TYPES)}",
            errors=[{"field": "requested_token_type", "message": "not issued here"}])
    return REQUESTED_TYPES[requested]


def _checked_form(body: s.TokenExchangeForm) -> None:
    if body.grant_type != GRANT_TOKEN_EXCHANGE:
        raise UnsupportedGrantType(f"the only grant_type served here is {GRANT_TOKEN_EXCHANGE}")
    if body.actor_token is not None or body.actor_token_type is not None:
        raise InvalidRequest("delegation (actor_token) is not supported",
                             errors=[{"field": "actor_token", "message": "not supported"}])
    if body.resource is not None:
        raise InvalidTarget("resource is not supported: name the token's audience instead")


async def _form_caller(request: web.Request, services: Services, surface: Surface) -> Caller:
    if "Authorization" in request.headers:
        # The form carries its credential as subject_token: a second one could only disagree.
        raise InvalidRequest("the form carries its credential as subject_token; send no "
                             "Authorization header with it")
    body = _parsed_form(await read_form(request))
    _checked_form(body)
    if body.subject_token_type in FEDERATED_SUBJECT_TYPES:
        return await _federated_caller(request, services, body)
    if body.subject_token_type not in DSN_SUBJECT_TYPES:
        accepted = DSN_SUBJECT_TYPES + FEDERATED_SUBJECT_TYPES
        raise InvalidRequest(
            f"subject_token_type must be one of {', '.join(accepted)}",
            errors=[{"field": "subject_token_type", "message": "not accepted here"}])
    if body.project is not None:
        raise InvalidRequest("project is for identity tokens: a project token names its own",
                             errors=[{"field": "project", "message": "not with a project token"}])
    kind = _requested_kind(body)
    claims = await services.authenticator.authenticate(body.subject_token, surface)
    request[EXCHANGE] = Exchange(kind, body.scope, body.audience, None, oauth=True)
    return token_caller(claims)


async def _federated_caller(request: web.Request, services: Services,
                            body: s.TokenExchangeForm) -> Caller:
    """An outside identity, verified and mapped to one project by the federation's rules."""
    if (body.requested_token_type or PROJECT_TOKEN) != PROJECT_TOKEN:
        raise InvalidRequest(f"an identity token is exchanged for a project token "
                             f"(requested_token_type {PROJECT_TOKEN})",
                             errors=[{"field": "requested_token_type", "message": "not issued "
                                      "for an identity token"}])
    if body.audience not in (None, services.settings.api_audience):
        raise InvalidTarget("a project token's audience is this API")
    identity = await request.app[FEDERATION].verify(body.subject_token,
                                                    services.policies.current.federation)
    rules = map_identity(identity, body.project)
    who = f"{FEDERATED}:{identity.label}"
    if not rules:
        wanted = f" to project {body.project!r}" if body.project else ""
        raise UnmappedIdentity(f"no rule of issuer {identity.issuer.name!r} maps this "
                               f"identity{wanted}", principal=who, rule=NO_MATCHING_RULE,
                               action="token:federate")
    projects = sorted({rule.project for rule in rules})
    if len(projects) > 1:
        raise InvalidRequest(f"the identity maps to several projects ({', '.join(projects)}): "
                             "name one with project",
                             errors=[{"field": "project", "message": "required"}])
    mapped = Mapped(identity, rules[0])
    request[EXCHANGE] = Exchange(TokenKind.PROJECT, body.scope, None, None, oauth=True,
                                 federated=mapped)
    principal = Principal(kind=FEDERATED, subject=identity.label, project=mapped.rule.project,
                          scopes=frozenset())
    return Caller(principal, f"{who}@{mapped.rule.project}#rule:{mapped.rule.id}", who,
                  action="token:federate")


async def exchange_credentials(request: web.Request, services: Services,
                               surface: Surface) -> Caller:
    """The caller of a token request: the form's ``subject_token``, or the JSON form's bearer
    token. Anything else is refused before a token is looked at."""
    if request.content_type == FORM:
        request[OAUTH_ERRORS] = True
        return await _form_caller(request, services, surface)
    # The JSON form: its body is read (and a wrong media type refused) once the caller is known.
    return token_caller(await services.authenticator.authenticate(bearer_token(request), surface))


def exchange_resource(request: web.Request, claims: Claims | None) -> Resource:
    if claims is not None:
        return Resource(kind="token", project=claims.project, name=None)
    mapped = request[EXCHANGE].federated if EXCHANGE in request else None
    return Resource(kind="token", project=mapped.rule.project if mapped else None, name=None)


# --- issuing -------------------------------------------------------------------------------------

def exchange_terms(services: Services, parent: Claims, wanted: Exchange,
                   now: float) -> tuple[str, frozenset[str], int]:
    """Audience, scope and ttl of the new token: never wider or longer-lived than the parent."""
    kind = wanted.kind
    default_audience = (services.settings.gateway_audience if kind is TokenKind.SESSION
                        else services.settings.api_audience)
    audience = wanted.audience or default_audience
    if audience not in (services.settings.api_audience, services.settings.gateway_audience):
        raise InvalidTarget("unknown audience",
                            errors=[{"field": "audience", "message": "not served here"}])
    allowed = parent.scope & services.policies.current.scopes_for(kind)
    scope = allowed if wanted.scope is None else frozenset(wanted.scope.split(" "))
    if not scope or not scope <= allowed:
        raise InvalidScope("the scope must be a non-empty subset of the project token's scopes "
                           f"that {kind.value} tokens may carry",
                           errors=[{"field": "scope", "message": "empty or too wide"}])
    remaining = int(parent.exp - now)
    if remaining < 1:
        raise ExpiredToken("the project token has expired")
    cap = services.policies.current.lifetime_cap(kind.value)
    return audience, scope, min(wanted.ttl or cap, cap, remaining)


async def _wanted(request: web.Request) -> Exchange:
    if EXCHANGE in request:
        return request[EXCHANGE]
    body = await parse_body(request, s.TokenExchange)
    return Exchange(TokenKind(body.kind), body.scope, body.audience, body.ttl, oauth=False)


def _issued(token: str, claims: Claims, wanted: Exchange) -> s.TokenResponse | s.IssuedToken:
    if wanted.oauth and claims.project is not None:
        return s.TokenResponse(access_token=token,
                               issued_token_type=DSN_TOKEN_TYPE + claims.kind.value,
                               expires_in=claims.exp - claims.iat,
                               scope=" ".join(sorted(claims.scope)), jti=claims.jti,
                               project=claims.project)
    return s.IssuedToken(token=token, jti=claims.jti, kind=claims.kind.value,
                         project=claims.project, subject=claims.sub,
                         scope=" ".join(sorted(claims.scope)), audience=claims.aud,
                         issued_at=s.utc(claims.iat), expires_at=s.utc(claims.exp),
                         expires_in=claims.exp - claims.iat)


async def _issue_federated(services: Services, mapped: Mapped,
                           wanted: Exchange) -> tuple[str, Claims]:
    """A project token for an outside identity: the rule's scopes (or fewer), the federation's
    lifetime cap (and the project kind's), counted against the project's token quota."""
    policy = services.policies.current
    allowed = frozenset(mapped.rule.scopes) & policy.scopes_for(TokenKind.PROJECT)
    scope = allowed if wanted.scope is None else frozenset(wanted.scope.split(" "))
    if not scope or not scope <= allowed:
        raise InvalidScope("the scope must be a non-empty subset of the scopes the federation's "
                           f"rule {mapped.rule.id!r} grants",
                           errors=[{"field": "scope", "message": "empty or too wide"}])
    project = await existing_project(services, mapped.rule.project)
    check_not_before(project, services.now())
    federation = policy.federation
    cap = policy.lifetime_cap(TokenKind.PROJECT)
    ttl = min(cap, federation.max_ttl) if federation is not None else cap
    token, claims = services.tokens.issue(
        kind=TokenKind.PROJECT, subject=mapped.identity.label, project=project.name, scope=scope,
        ttl_s=ttl, audience=services.settings.api_audience)
    await remember_token(services, claims, None, project)
    return token, claims


async def exchange_token(request: web.Request) -> web.Response:
    services, parent = request.app[SERVICES], request[CALLER].claims
    wanted = await _wanted(request)
    if wanted.federated is not None:
        token, claims = await _issue_federated(services, wanted.federated, wanted)
        return reply(_issued(token, claims, wanted), 200,
                     {"Cache-Control": "no-store", "Pragma": "no-cache"})
    if parent is None or parent.project is None:  # verification guarantees both; never guess
        raise InvalidClaim("a project token must name its project")
    now = services.now()
    audience, scope, ttl = exchange_terms(services, parent, wanted, now)
    project = await existing_project(services, parent.project)
    check_not_before(project, now)
    token, claims = services.tokens.issue(kind=wanted.kind, subject=parent.sub,
                                          project=parent.project, scope=scope, ttl_s=ttl,
                                          audience=audience)
    await remember_token(services, claims, parent.jti, project)
    return reply(_issued(token, claims, wanted), 200,
                 {"Cache-Control": "no-store", "Pragma": "no-cache"})


# --- metadata ------------------------------------------------------------------------------------

def server_metadata(services: Services) -> s.ServerMetadata:
    base = services.settings.public_base_url
    return s.ServerMetadata(
        issuer=base, token_endpoint=base + TOKEN_PATH, jwks_uri=base + "/.well-known/jwks.json",
        grant_types_supported=[GRANT_TOKEN_EXCHANGE],
        # The subject token is the credential; no client is registered or authenticated.
        token_endpoint_auth_methods_supported=["none"],
        scopes_supported=sorted(SCOPES), response_types_supported=[],
        dsn_token_issuer=services.settings.issuer,
        dsn_subject_token_types_supported=list(DSN_SUBJECT_TYPES + FEDERATED_SUBJECT_TYPES),
        dsn_requested_token_types_supported=[*REQUESTED_TYPES, PROJECT_TOKEN],
        service_documentation=base + "/openapi.json")


async def metadata(request: web.Request) -> web.Response:
    headers = {"Cache-Control": f"public, max-age={request.app[SERVICES].settings.jwks_max_age_s}"}
    return reply(server_metadata(request.app[SERVICES]), headers=headers)


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", METADATA_PATH, metadata, "OAuth 2.0 authorization server metadata (RFC 8414)",
              s.ServerMetadata, tag="tokens", response_headers=("Cache-Control",)),
    RouteSpec("POST", TOKEN_PATH, exchange_token,
              "Exchange a project token for a session or consumer token: RFC 8693 "
              "(form-encoded, the project token as subject_token) or JSON (the project token as "
              "Bearer)", s.IssuedToken, 200, "token:exchange", PROJECT_ONLY, exchange_resource,
              s.TokenExchange, tag="tokens", credentials=exchange_credentials,
              form=s.TokenExchangeForm, form_response=s.TokenResponse,
              response_headers=("Cache-Control",)),
)
