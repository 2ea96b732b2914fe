"""Named admin principals over REST: adding, listing, issuing tokens to and removing admins, and
``whoami``; handlers, the resource each action names, and ``ROUTES``.

Admins are peers: any admin may add another, issue or rotate any admin's tokens and remove any
admin but the last active one (409). An admin token's ``sub`` is its admin's name, so the audit
record of every request names the admin who made it; a token issued here records, as its
``parent_jti``, the admin token that asked for it. Removing an admin revokes all its tokens at once,
and ``Authenticator`` refuses an admin token whose admin is not active (SQL: ``store.admins``).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from controlplane import schemas as s
from controlplane.errors import NotFound
from controlplane.middlewares import CLAIMS, SERVICES, RouteSpec, Services, principal_label
from controlplane.policy import Resource
from controlplane.store import admins as admin_repo
from controlplane.store import tokens as token_repo
from controlplane.store.admins import Admin
from controlplane.store.tokens import TokenRecord
from controlplane.tokens import Claims, TokenKind
from controlplane.views import ADMIN, _issued, _token_info, parse_body, reply

ADMINS_PATH: Final = "/api/v1/admins"
ADMIN_PATH: Final = ADMINS_PATH + "/{admin}"
NO_STORE: Final = {"Cache-Control": "no-store"}


def _admin_out(admin: Admin) -> s.AdminOut:
    return s.AdminOut(name=admin.name, active=admin.active, created_at=s.utc(admin.created_at),
                      created_by=admin.created_by,
                      removed_at=None if admin.removed_at is None else s.utc(admin.removed_at),
                      live_tokens=admin.live_tokens,
                      last_expiry=None if admin.last_expiry is None else s.utc(admin.last_expiry))


def _admin_token(services: Services, name: str, ttl: int | None,
                 parent_jti: str) -> tuple[str, Claims, TokenRecord]:
    """A signed admin token for ``name`` with every scope the policy grants admin tokens, and its
    record naming the token that asked for it."""
    policy = services.policies.current
    token, claims = services.tokens.issue(
        kind=TokenKind.ADMIN, subject=name, project=None, scope=policy.admin_scopes(),
        ttl_s=ttl or policy.lifetime_cap(TokenKind.ADMIN), audience=services.settings.api_audience)
    record = TokenRecord(jti=claims.jti, project=None, kind=claims.kind.value, subject=claims.sub,
                         scope=" ".join(sorted(claims.scope)), issued_at=claims.iat,
                         expires_at=claims.exp, parent_jti=parent_jti)
    return token, claims, record


async def add_admin(request: web.Request) -> web.Response:
    body = await parse_body(request, s.AdminCreate)
    services, caller = request.app[SERVICES], request[CLAIMS]
    token, claims, record = _admin_token(services, body.name, body.ttl, caller.jti)
    await admin_repo.enable_admin(services.store, record, by=principal_label(caller),
                                  at=services.now(), exists_ok=False)
    services.metrics.tokens_issued.labels(claims.kind.value).inc()
    return reply(_issued(token, claims), 201,
                 {**NO_STORE, "Location": f"{ADMINS_PATH}/{body.name}"})


async def list_admins(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    admins = await admin_repo.list_admins(services.store, services.now())
    return reply(s.AdminList(items=[_admin_out(admin) for admin in admins]))


async def list_admin_tokens(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info["admin"]
    if await admin_repo.get_admin(services.store, name, services.now()) is None:
        raise NotFound(f"admin {name!r} does not exist")
    records = await token_repo.list_admin_tokens(services.store, name)
    return reply(s.TokenList(items=[_token_info(record) for record in records]))


async def issue_admin_token(request: web.Request) -> web.Response:
    body = await parse_body(request, s.AdminTokenIssue)
    services, caller = request.app[SERVICES], request[CLAIMS]
    token, claims, record = _admin_token(services, request.match_info["admin"], body.ttl,
                                         caller.jti)
    await admin_repo.add_admin_token(
        services.store, record, revoke_others_at=services.now() if body.revoke_others else None)
    services.metrics.tokens_issued.labels(claims.kind.value).inc()
    return reply(_issued(token, claims), 201, NO_STORE)


async def remove_admin(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    removed = await admin_repo.remove_admin(services.store, request.match_info["admin"],
                                            services.now())
    return reply(_admin_out(removed))


async def whoami(request: web.Request) -> web.Response:
    claims, now = request[CLAIMS], int(request.app[SERVICES].now())
    return reply(s.Whoami(kind=claims.kind.value, subject=claims.sub, jti=claims.jti,
                          scope=" ".join(sorted(claims.scope)), issued_at=s.utc(claims.iat),
                          expires_at=s.utc(claims.exp), expires_in=max(0, claims.exp - now)))


def _admins(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="admin", project=None, name=None)


def _admin(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="admin", project=None, name=request.match_info["admin"])


def _caller(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="admin", project=None, name=claims.sub if claims else None)


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("POST", ADMINS_PATH, add_admin, "Add an admin (or enable a removed one again) with "
              "its first token (returned once)", s.IssuedToken, 201, "admins:create", ADMIN,
              _admins, s.AdminCreate, tag="admins"),
    RouteSpec("GET", ADMINS_PATH, list_admins, "List admins, with their live tokens",
              s.AdminList, 200, "admins:list", ADMIN, _admins, tag="admins"),
    RouteSpec("DELETE", ADMIN_PATH, remove_admin, "Remove an admin and revoke all its tokens "
              "(idempotent; 409 for the last active admin)", s.AdminOut, 200, "admins:remove",
              ADMIN, _admin, tag="admins"),
    RouteSpec("GET", ADMIN_PATH + "/tokens", list_admin_tokens,
              "List an admin's tokens (metadata only)", s.TokenList, 200, "admins:read", ADMIN,
              _admin, tag="admins"),
    RouteSpec("POST", ADMIN_PATH + "/tokens", issue_admin_token,
              "Issue a token to an active admin (returned once); revoke_others makes it a "
              "rotation", s.IssuedToken, 201,
              "admins:issue", ADMIN, _admin, s.AdminTokenIssue, tag="admins"),
    RouteSpec("GET", "/api/v1/whoami", whoami, "The calling admin token: who, which, until when",
              s.Whoami, 200, "admins:whoami", ADMIN, _caller, tag="admins"),
)
