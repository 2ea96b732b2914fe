"""Thin handlers and the route table: every served route is declared once in ``ROUTES``.

A handler parses its input with the declared model, calls a service and serialises the answer;
authentication, rate limiting, the policy decision and its audit record already happened in
``middlewares.authorize`` from the same declaration, and the OpenAPI document is built from it.

Cross-project access is answered with **403**, everywhere: every route under
``/api/v1/projects/{project}`` accepts project tokens, the policy decides before any handler looks
anything up (rule ``cross-project``), so the answer is the same whether the other project exists or
not and reveals nothing about it. A project token on its own project's admin-only actions gets 403
too (rule ``administration-is-for-admins``); only token kinds never valid on a route get 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from controlplane import schemas as s
from controlplane.errors import (
    Conflict,
    ControlPlaneError,
    InvalidRequest,
    NotFound,
    Unavailable,
    UnsupportedMediaType,
)
from controlplane.middlewares import SERVICES, ResourceOf, RouteSpec, Services
from controlplane.openapi import OPENAPI
from controlplane.policy import Resource
from controlplane.schemas import RepeatedName, json_without_repeats
from controlplane.store import projects as project_repo
from controlplane.store import tokens as token_repo
from controlplane.store.audit import AuditFilter, AuditRecord, audit_head
from controlplane.store.engine import Conn
from controlplane.store.projects import Project
from controlplane.store.tokens import TokenRecord
from controlplane.tokens import Claims, TokenKind

M = TypeVar("M", bound=BaseModel)
ADMIN = frozenset({TokenKind.ADMIN})
ADMIN_OR_PROJECT = frozenset({TokenKind.ADMIN, TokenKind.PROJECT})
PROJECT_ONLY = frozenset({TokenKind.PROJECT})
TOKEN_QUOTA = "tokens"  # live tokens a project may hold, exchanged ones included


# --- parsing and serialising ---------------------------------------------------------------------

def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    # Only the location and pydantic's message: the offending input is never echoed back.
    return [{"field": ".".join(str(part) for part in error["loc"]) or "body",
             "message": error["msg"]}
            for error in exc.errors(include_input=False, include_url=False)]


async def parse_body(request: web.Request, model: type[M], *, max_bytes: int | None = None) -> M:
    """The body as ``model``; it may be as long as the app's client_max_size, or ``max_bytes``
    where a route needs another bound (413 beyond it, from the announced length before anything
    is read), and must arrive within ``body_timeout_s`` (408 after)."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the request body must be application/json")
    settings = request.app[SERVICES].settings
    limit = settings.client_max_size if max_bytes is None else max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    reader = request if max_bytes is None else request.clone(client_max_size=max_bytes)
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            raw: bytes = await reader.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive within {settings.body_timeout_s:g} s") from None
    try:
        json_without_repeats(raw or b"null")
    except RepeatedName as repeated:
        raise InvalidRequest(f"the request body names '{repeated}' twice",
                         errors=[{"field": str(repeated), "message": "repeated"}]) from None
    except ValueError:
        pass  # not JSON at all: the model's own parse below names the problem
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise InvalidRequest("the request body is invalid", errors=validation_errors(exc)) from None


def parse_query(request: web.Request, model: type[M]) -> M:
    if len(set(request.query)) != len(request.query):
        raise InvalidRequest("a query parameter is repeated")
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise InvalidRequest("the query string is invalid", errors=validation_errors(exc)) from None


def reply(model: BaseModel, status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, headers=headers,
                        content_type="application/json")


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _project_out(p: Project) -> s.ProjectOut:
    return s.ProjectOut(name=p.name, allowed_templates=list(p.allowed_templates), quotas=p.quotas,
                        not_before=None if p.not_before is None else s.utc(p.not_before),
                        created_at=s.utc(p.created_at))


def _token_info(t: TokenRecord) -> s.TokenInfo:
    return s.TokenInfo(jti=t.jti, project=t.project, kind=t.kind, subject=t.subject, scope=t.scope,
                       issued_at=s.utc(t.issued_at), expires_at=s.utc(t.expires_at),
                       revoked_at=None if t.revoked_at is None else s.utc(t.revoked_at),
                       parent_jti=t.parent_jti)


def _issued(token: str, claims: Claims) -> s.IssuedToken:
    return s.IssuedToken(token=token, jti=claims.jti, kind=claims.kind.value,
                         project=claims.project, subject=claims.sub,
                         scope=" ".join(sorted(claims.scope)), audience=claims.aud,
                         issued_at=s.utc(claims.iat), expires_at=s.utc(claims.exp),
                         expires_in=claims.exp - claims.iat)


async def existing_project(services: Services, name: str) -> Project:
    project = await project_repo.get_project(services.store, name)
    if project is None:
        raise NotFound(f"project {name!r} does not exist")
    return project


# --- public routes -------------------------------------------------------------------------------

async def jwks(request: web.Request) -> web.StreamResponse:
    services = _services(request)
    body = json.dumps(services.keyring.jwks(), sort_keys=True, separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": f"public, max-age={services.settings.jwks_max_age_s}"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers, content_type="application/json")


async def _nothing(conn: Conn) -> None:
    """A write transaction that changes nothing: it takes the write lock and commits."""


async def healthz(request: web.Request) -> web.Response:
    return reply(s.Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    services = _services(request)
    await audit_head(services.store)  # a real read: raises Unavailable when the store is down
    # Every API request writes its audit record: a store that cannot take writes (locked by
    # another process) is not ready, even while reads still work.
    await services.store.write(_nothing)
    free = (await asyncio.to_thread(shutil.disk_usage, services.settings.state_dir)).free
    if free < services.settings.min_free_bytes:
        # Every request appends to the audit log: a full disk would refuse them all.
        raise Unavailable(f"the state directory's disk has {free} bytes free, fewer than "
                          f"{services.settings.min_free_bytes}")
    try:
        services.keyring.signing_key()
    except ControlPlaneError:
        raise Unavailable("no signing key is loaded") from None
    return reply(s.Health(status="ok"))


async def metrics(request: web.Request) -> web.Response:
    services = _services(request)
    published = services.state.sessions.values()
    services.metrics.live_sessions.set(len(published))
    services.metrics.live_consumers.set(sum(len(s.consumers) for s in published))
    body, content_type = services.metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


# --- projects ------------------------------------------------------------------------------------

async def create_project(request: web.Request) -> web.Response:
    body = await parse_body(request, s.ProjectCreate)
    services = _services(request)
    project = Project(name=body.name, allowed_templates=tuple(body.allowed_templates),
                      quotas=dict(body.quotas), not_before=None, created_at=services.now())
    await project_repo.create_project(services.store, project)
    return reply(_project_out(project), 201, {"Location": f"/api/v1/projects/{project.name}"})


async def list_projects(request: web.Request) -> web.Response:
    projects = await project_repo.list_projects(_services(request).store)
    return reply(s.ProjectList(items=[_project_out(p) for p in projects]))


async def get_project(request: web.Request) -> web.Response:
    project = await existing_project(_services(request), request.match_info["project"])
    return reply(_project_out(project))


def _next_not_before(body: s.ProjectUpdate, current: Project, now: float) -> float | None:
    """A new not_before, rounded up to a whole second (token ``iat`` is whole seconds, so a token
    issued in the same second as the cut-off dies with the older ones). It may only move forward:
    moving it back would revive tokens that were cut off."""
    if body.not_before is None:
        return None
    wanted = float(math.ceil(body.not_before.timestamp()))
    if wanted > now + 60:
        raise InvalidRequest("not_before may not lie in the future",
                             errors=[{"field": "not_before", "message": "more than 60 s ahead"}])
    if current.not_before is not None and wanted < current.not_before:
        raise InvalidRequest("not_before may only move forward",
                             errors=[{"field": "not_before",
                                      "message": "earlier than the current one"}])
    return wanted


async def update_project(request: web.Request) -> web.Response:
    body = await parse_body(request, s.ProjectUpdate)
    services = _services(request)
    current = await existing_project(services, request.match_info["project"])
    project = await project_repo.update_project(
        services.store, current.name, allowed_templates=body.allowed_templates, quotas=body.quotas,
        not_before=_next_not_before(body, current, services.now()))
    return reply(_project_out(project))


# --- tokens --------------------------------------------------------------------------------------

def check_not_before(project: Project, now: float) -> None:
    if project.not_before is not None and int(now) < project.not_before:
        raise Conflict("the project's not_before cut-off is this second; retry in a moment",
                       retry_after_s=1)


def _token_quota(services: Services, project: Project) -> int:
    return project.quotas.get(TOKEN_QUOTA, services.policies.current.quota(project.name,
                                                                           TOKEN_QUOTA))


async def remember_token(services: Services, claims: Claims, parent_jti: str | None,
                    project: Project) -> None:
    """Record an issued token, within its project's token quota."""
    await token_repo.add_token(services.store, TokenRecord(
        jti=claims.jti, project=claims.project, kind=claims.kind.value, subject=claims.sub,
        scope=" ".join(sorted(claims.scope)), issued_at=claims.iat, expires_at=claims.exp,
        revoked_at=None, parent_jti=parent_jti), limit=_token_quota(services, project))
    services.metrics.tokens_issued.labels(claims.kind.value).inc()


def _check_scope(services: Services, kind: TokenKind, scope: str) -> None:
    beyond = set(scope.split(" ")) - services.policies.current.scopes_for(kind)
    if beyond:
        raise InvalidRequest(f"the policy grants {kind.value} tokens no scope {min(beyond)!r}",
                         errors=[{"field": "scope", "message": "beyond the policy's roles"}])


async def issue_project_token(request: web.Request) -> web.Response:
    body = await parse_body(request, s.TokenIssue)
    services, now = _services(request), _services(request).now()
    project = await existing_project(services, request.match_info["project"])
    check_not_before(project, now)
    policy = services.policies.current
    scope = body.scope or " ".join(sorted(policy.scopes_for(TokenKind.PROJECT)))
    _check_scope(services, TokenKind.PROJECT, scope)
    token, claims = services.tokens.issue(
        kind=TokenKind.PROJECT, subject=body.subject, project=project.name,
        scope=scope.split(" "), ttl_s=body.ttl or policy.lifetime_cap(TokenKind.PROJECT),
        audience=services.settings.api_audience)
    await remember_token(services, claims, None, project)
    return reply(_issued(token, claims), 201, {"Cache-Control": "no-store"})


async def list_project_tokens(request: web.Request) -> web.Response:
    services = _services(request)
    project = await existing_project(services, request.match_info["project"])
    records = await token_repo.list_tokens(services.store, project.name)
    return reply(s.TokenList(items=[_token_info(r) for r in records]))


async def revoke_token(request: web.Request) -> web.Response:
    services = _services(request)
    record = await token_repo.revoke_token(services.store, request.match_info["jti"],
                                          services.now())
    if record.kind == TokenKind.SESSION.value:
        # A session whose token is revoked ends at the gateways now, not at the next reconcile.
        await services.state.reconcile()
    return reply(_token_info(record))


# --- keys, policies, audit -----------------------------------------------------------------------

async def rotate_keys(request: web.Request) -> web.Response:
    services = _services(request)
    now = services.now()
    kid = await services.keyring.rotate(now)
    longest = max(services.policies.current.lifetime_cap(kind.value) for kind in TokenKind)
    retired = await services.keyring.retire_expired(now, longest)
    published = [key["kid"] for key in services.keyring.jwks()["keys"]]
    return reply(s.KeyRotation(kid=kid, published=published, retired=retired))


async def get_policies(request: web.Request) -> web.Response:
    current = _services(request).policies.current
    return reply(s.PolicySummary(sources=list(current.sources), policy=current.describe(),
                                 digest=current.digest))


async def reload_policies(request: web.Request) -> web.Response:
    services = _services(request)
    # Reading and validating the files is disk I/O: keep it off the event loop.
    ok, problems = await asyncio.to_thread(services.policies.reload, services.settings.policy_path)
    # 200 either way: the reload ran; ``ok`` false means the previous set is still in force.
    return reply(s.PolicyReload(ok=ok, problems=list(problems),
                                sources=list(services.policies.current.sources)))


def _audit_out(record: AuditRecord) -> s.AuditRecordOut:
    fields = {name: getattr(record, name) for name in s.AuditRecordOut.model_fields}
    return s.AuditRecordOut.model_validate({**fields, "ts": s.utc(fields["ts"])})


async def list_audit(request: web.Request) -> web.Response:
    query = parse_query(request, s.AuditQuery)
    where = AuditFilter(
        after_seq=query.after, before_seq=query.before, principal=query.principal,
        action=query.action, decision=query.decision,
        since=None if query.since is None else query.since.timestamp(),
        until=None if query.until is None else query.until.timestamp())
    records = await _services(request).audit.search(where, query.limit,
                                                    newest_first=query.order == "desc")
    seqs = [r.seq for r in records]
    return reply(s.AuditList(items=[_audit_out(r) for r in records],
                             next_after=max(seqs, default=query.after),
                             next_before=min(seqs) if seqs else query.before))


async def verify_audit(request: web.Request) -> web.Response:
    services = _services(request)
    result = await services.checkpoints.verify(services.audit)
    return reply(s.AuditVerification(ok=result.ok, records=result.records,
                                     first_bad_seq=result.first_bad_seq,
                                     problem=result.problem or None,
                                     checkpoints=result.checkpoints))


# --- resources named by each action --------------------------------------------------------------

def _projects(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="project", project=None, name=None)


def _project(request: web.Request, claims: Claims | None) -> Resource:
    name = request.match_info["project"]
    return Resource(kind="project", project=name, name=name)


def _project_tokens(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="token", project=request.match_info["project"], name=None)


def _token(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="token", project=None, name=request.match_info["jti"])


def _singleton(kind: str) -> ResourceOf:
    def resource(request: web.Request, claims: Claims | None) -> Resource:
        return Resource(kind=kind, project=None, name=None)
    return resource


PROJECT_PATH = "/api/v1/projects/{project}"

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", "/.well-known/jwks.json", jwks, "Public token verification keys (JWK Set)",
              s.Jwks, tag="keys", extra_responses=(304,), request_headers=("If-None-Match",),
              response_headers=("ETag", "Cache-Control")),
    RouteSpec("GET", "/healthz", healthz, "Liveness", s.Health),
    RouteSpec("GET", "/readyz", readyz, "Readiness: store reachable, signing key loaded", s.Health),
    RouteSpec("GET", "/metrics", metrics, "Prometheus metrics", None,
              response_content_type="text/plain"),
    RouteSpec("GET", "/openapi.json", openapi, "This OpenAPI document", None),
    RouteSpec("POST", "/api/v1/projects", create_project, "Create a project", s.ProjectOut, 201,
              "projects:create", ADMIN, _projects, s.ProjectCreate, tag="projects",
              response_headers=("Location",)),
    RouteSpec("GET", "/api/v1/projects", list_projects, "List projects", s.ProjectList, 200,
              "projects:list", ADMIN, _projects, tag="projects"),
    RouteSpec("GET", PROJECT_PATH, get_project, "Show a project", s.ProjectOut, 200,
              "projects:read", ADMIN_OR_PROJECT, _project, tag="projects"),
    RouteSpec("PATCH", PROJECT_PATH, update_project, "Change a project's templates, quotas or "
              "not_before", s.ProjectOut, 200, "projects:update", ADMIN_OR_PROJECT, _project,
              s.ProjectUpdate, tag="projects"),
    RouteSpec("POST", PROJECT_PATH + "/tokens", issue_project_token,
              "Issue a project token (returned once)", s.IssuedToken, 201, "tokens:issue",
              ADMIN_OR_PROJECT, _project_tokens, s.TokenIssue, tag="tokens",
              response_headers=("Cache-Control",)),
    RouteSpec("GET", PROJECT_PATH + "/tokens", list_project_tokens,
              "List a project's tokens (metadata only)", s.TokenList, 200, "tokens:list",
              ADMIN_OR_PROJECT, _project_tokens, tag="tokens"),
    RouteSpec("DELETE", "/api/v1/tokens/{jti}", revoke_token, "Revoke a token (idempotent)",
              s.TokenInfo, 200, "tokens:revoke", ADMIN, _token, tag="tokens"),
    RouteSpec("POST", "/api/v1/keys/rotate", rotate_keys, "Rotate the signing key",
              s.KeyRotation, 200, "keys:rotate", ADMIN, _singleton("key"), tag="keys"),
    RouteSpec("GET", "/api/v1/policies", get_policies, "The active policy set", s.PolicySummary,
              200, "policies:read", ADMIN, _singleton("policy"), tag="policies"),
    RouteSpec("POST", "/api/v1/policies/reload", reload_policies,
              "Reload the policy files; an invalid set is refused and the old one stays",
              s.PolicyReload, 200, "policies:reload", ADMIN, _singleton("policy"), tag="policies"),
    RouteSpec("GET", "/api/v1/audit", list_audit, "Read the audit log", s.AuditList, 200,
              "audit:read", ADMIN, _singleton("audit"), query=s.AuditQuery, tag="audit"),
    RouteSpec("GET", "/api/v1/audit/verify", verify_audit, "Verify the audit hash chain",
              s.AuditVerification, 200, "audit:verify", ADMIN, _singleton("audit"), tag="audit"),
)
