"""The request pipeline: ``observe`` -> ``problems`` -> ``paths`` -> ``authorize`` -> view.

- ``observe`` gives the request its id (a sane incoming ``X-Request-ID`` or a fresh one), echoes it
  on the response and counts the request by route template and status.
- ``problems`` turns every failure into an RFC 9457 ``application/problem+json`` body carrying the
  request id; an unexpected exception is logged here and answered with a bare 500, never a trace.
- ``paths`` answers 404 for a path parameter outside its bounds (``controlplane.paths``), before
  anything looks it up: a token pasted into a URL goes no further.
- ``authorize`` runs the route's declared checks (``RouteSpec``): bearer token for the route's
  surface, or the web console's sign-in cookie standing for one (or the route's own
  ``credentials``: the token endpoint's OAuth form carries its credential in the body), rate
  limits per token and project (per client address for requests that fail authentication), the
  policy decision for the route's action. Each policy decision,
  allow or deny, writes exactly one audit record first; if that write fails the request is
  refused with 503, never served unaudited. Refusals that come in floods (no or a bad token, a
  spent rate limit) are audited per principal and window: the first as it happens, the rest as
  one count.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import AbstractRoute, SystemRoute
from pydantic import BaseModel

from controlplane.anchor import Checkpoints
from controlplane.audit import AuditLog
from controlplane.console import auth as console
from controlplane.errors import (
    ControlPlaneError,
    CsrfRefused,
    InvalidRequest,
    MalformedToken,
    MissingToken,
    PermissionDenied,
    RateLimited,
    TokenError,
    UnmappedIdentity,
)
from controlplane.launchers import Launcher
from controlplane.metrics import Metrics
from controlplane.paths import valid
from controlplane.pictures import PictureCache
from controlplane.policy import Decision, PolicyHolder, Principal, Resource
from controlplane.problems import (
    PROBLEM_TYPE_PREFIX,
    field_errors,
    oauth_error,
    problem_headers,
    problem_type,
)
from controlplane.ratelimit import RateLimiter
from controlplane.settings import IPNetwork, Settings
from controlplane.signing import KeyRing
from controlplane.state import StateService
from controlplane.store.engine import Store
from controlplane.tokens import Authenticator, Claims, Surface, TokenKind, TokenService

log = logging.getLogger("dsn.controlplane.http")

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
REQUEST_ID_HEADER: Final = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
# What a pasted token looks like: a JWS (three long base64url segments), or any segment longer
# than every name the API uses (64 characters at most), which could be some other secret.
_TOKEN_SHAPED = re.compile(r"[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}|.{65,}")
REDACTED: Final = "(redacted)"
ANONYMOUS: Final = "anonymous"

# A resource named by stored state (a session's project) or by the body is awaited: looked up or
# read before the policy decides.
ResourceOf = Callable[[web.Request, Claims | None], Resource | Awaitable[Resource]]


@dataclass(frozen=True)
class Caller:
    """Who a request acts as, as the policy, the rate limiter and the audit log see it: a verified
    DSN token (``claims``) or another verified identity (a federated one at the token endpoint)."""

    principal: Principal
    label: str  # the audit record's principal; never a token
    rate_key: str  # what the per-token rate limit counts
    claims: Claims | None = None
    action: str | None = None  # the action this caller asks for, where not the route's


# Where a route finds and verifies its caller's credential, instead of the Authorization header.
Credentials = Callable[[web.Request, "Services", Surface], Awaitable[Caller]]


@dataclass(frozen=True)
class RouteSpec:
    """One served route, declared once: the handler, its models and its authorization.

    ``kinds`` are the token kinds accepted on the route (its surface, with the API audience);
    an empty set makes the route public (no token, no policy action, nothing audited).
    ``resource`` names what the action touches, for the policy and the audit record.
    ``response`` is the answer's model (for a ``text/event-stream`` answer: each event's data).
    ``credentials`` replaces the bearer header as the source of the caller (None: the header).
    ``form``/``form_response`` are the OAuth (form-encoded) alternative to ``body``/``response``;
    ``request_headers``/``response_headers`` name the headers the route reads and sets (for the
    OpenAPI document); ``max_body`` is the route's body bound where it is not ``client_max_size``.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel] | None
    status: int = 200
    action: str | None = None
    kinds: frozenset[TokenKind] = frozenset()
    resource: ResourceOf | None = None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    tag: str = "service"
    response_content_type: str = "application/json"
    extra_responses: tuple[int, ...] = ()
    credentials: Credentials | None = None
    form: type[BaseModel] | None = None
    form_response: type[BaseModel] | None = None
    request_headers: tuple[str, ...] = ()
    response_headers: tuple[str, ...] = ()
    max_body: int | None = None

    @property
    def public(self) -> bool:
        return not self.kinds


@dataclass
class Services:
    """Everything the views and middlewares use, built once per app in ``app.services_ctx``."""

    settings: Settings
    store: Store
    keyring: KeyRing
    tokens: TokenService
    authenticator: Authenticator
    policies: PolicyHolder
    limiter: RateLimiter
    audit: AuditLog
    checkpoints: Checkpoints  # signed checkpoints of the audit chain, outside the database
    metrics: Metrics
    state: StateService  # publishes the live sessions to the gateways
    surfaces: dict[frozenset[TokenKind], Surface] = field(default_factory=dict)
    launchers: Mapping[str, Launcher] = field(default_factory=dict)  # by name: the configured one
    # Scans' rendered pictures: one bounded cache per app.
    pictures: PictureCache = field(default_factory=PictureCache)

    def surface(self, kinds: frozenset[TokenKind]) -> Surface:
        if kinds not in self.surfaces:
            self.surfaces[kinds] = Surface(self.settings.api_audience, kinds)
        return self.surfaces[kinds]

    def now(self) -> float:
        return self.settings.clock()


SERVICES: Final = web.AppKey("services", Services)
METRICS: Final = web.AppKey("metrics", Metrics)
ROUTE_SPECS: Final = web.AppKey("route_specs", dict[AbstractRoute, RouteSpec])
REQUEST_ID: Final = web.RequestKey("request_id", str)
CLIENT: Final = web.RequestKey("client", str)  # the client's address, through trusted proxies
CLAIMS: Final = web.RequestKey("claims", Claims)
CALLER: Final = web.RequestKey("caller", Caller)
# Set once a request is known to be an OAuth token request: its errors are RFC 6749 §5.2 JSON.
OAUTH_ERRORS: Final = web.RequestKey("oauth_errors", bool)


# --- observe -------------------------------------------------------------------------------------

def _request_id(request: web.Request) -> str:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    return incoming if _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request: method, path without its query string (a client may put a
    token there; it is never logged), status, size, duration, request id and peer."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        request_id = request.get(REQUEST_ID, "") if isinstance(request, web.Request) else ""
        self.logger.info("request", extra={"fields": {
            "method": request.method, "path": redact(request.path), "status": response.status,
            "bytes": response.body_length, "duration_ms": round(time * 1000, 3),
            "request_id": request_id, "peer": request.remote,
            "client": request.get(CLIENT, request.remote) if isinstance(request, web.Request)
            else request.remote}})


def _without_request_bytes(record: logging.LogRecord) -> bool:
    """A filter for ``aiohttp.server``: an unparsable request (a header too long, a bad line) is
    logged with a slice of the offending bytes, which may be part of a token. Keep the fact and
    the peer, drop the bytes and the traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.msg = "malformed HTTP request refused: %s from %s"
        # aiohttp logs these with positional arguments, the peer first.
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.args = (type(error).__name__, peer)
        record.exc_info, record.exc_text = None, None
    return True


def quiet_protocol_errors() -> None:
    """Install the filter that keeps request bytes out of ``aiohttp.server``'s error log."""
    server = logging.getLogger("aiohttp.server")
    if _without_request_bytes not in server.filters:
        server.addFilter(_without_request_bytes)


def client_address(peer: str | None, forwarded_for: list[str],
                   proxies: tuple[IPNetwork, ...]) -> str:
    """The address a request came from: its peer's, unless the peer is a trusted proxy; then the
    right-most ``X-Forwarded-For`` hop that is not one (each proxy appends the address it was
    reached from, so hops to the left of an untrusted one may be the client's own invention)."""
    address = peer or "unknown"
    if not proxies or not _is_proxy(_ip(address), proxies):
        return address
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        ip = _ip(hop)
        if not _is_proxy(ip, proxies):
            return hop if ip is not None else address
    return address


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_proxy(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
              proxies: tuple[IPNetwork, ...]) -> bool:
    return ip is not None and any(ip in net for net in proxies)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = _request_id(request)
    request[CLIENT] = client_address(request.remote, request.headers.getall("X-Forwarded-For", []),
                                     request.app[SERVICES].settings.proxy_networks)
    metrics = request.app[METRICS]
    route = _route_label(request)
    started = time.perf_counter()
    response = await handler(request)
    metrics.latency.labels(route).observe(time.perf_counter() - started)
    metrics.requests.labels(request.method, route, str(response.status)).inc()
    response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    return response


# --- problems ------------------------------------------------------------------------------------

def problem_response(request: web.Request, *, status: int, title: str, detail: str, slug: str,
                     errors: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + slug, "title": title, "status": status, "detail": detail,
        "instance": request.path, "request_id": request[REQUEST_ID],
    }
    if errors:
        body["errors"] = errors
    return web.json_response(body, status=status, headers=headers,
                             content_type=PROBLEM_CONTENT_TYPE)


def oauth_error_response(request: web.Request, status: int, error: str, description: str,
                         headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 6749 §5.2 error (``error``, ``error_description``), never cached."""
    return web.json_response({"error": error, "error_description": description}, status=status,
                             headers={**(headers or {}), "Cache-Control": "no-store",
                                      "Pragma": "no-cache"})


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    # aiohttp's own refusals: unknown path (404), method (405, keeps Allow), a body too slow
    # (408) or too large (413), whose texts say by how much.
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    slug = re.sub(r"[^a-z0-9]+", "-", exc.reason.lower()).strip("-")
    detail = exc.text if exc.status in (408, 413) and exc.text else exc.reason
    if request.get(OAUTH_ERRORS):
        return oauth_error_response(request, exc.status, "invalid_request", detail, headers)
    return problem_response(request, status=exc.status, title=exc.reason, detail=detail, slug=slug,
                            headers=headers)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ControlPlaneError as exc:
        if request.get(OAUTH_ERRORS):
            status, error = oauth_error(exc)
            # No errors member in RFC 6749's shape: the fields at fault go into the description.
            named = "; ".join(f"{e['field']}: {e['message']}" for e in field_errors(exc))
            return oauth_error_response(request, status, error,
                                        f"{exc.detail} ({named})" if named else exc.detail,
                                        problem_headers(exc, bearer=False))
        kind = problem_type(exc)
        if kind.status >= 500:
            log.warning("refused: %s", exc.detail,
                        extra={"fields": {"request_id": request[REQUEST_ID]}})
        return problem_response(request, status=kind.status, title=kind.title, detail=exc.detail,
                                slug=kind.slug, errors=field_errors(exc),
                                headers=problem_headers(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(request, exc)
    except Exception:
        log.exception("unhandled error", extra={"fields": {"request_id": request[REQUEST_ID],
                                                           "route": _route_label(request)}})
        return problem_response(request, status=500, title="Internal error",
                                detail="Internal error", slug="internal")


# --- authorize -----------------------------------------------------------------------------------

def bearer_token(request: web.Request) -> str:
    if len(request.headers.getall("Authorization", [])) > 1:
        # Which one would count differs between proxies and servers: take none.
        raise MalformedToken("the request carries more than one Authorization header")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise MissingToken("an Authorization: Bearer token is required")
    if scheme.lower() != "bearer" or not token.strip():
        raise MalformedToken("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def token_caller(claims: Claims) -> Caller:
    principal = Principal(kind=claims.kind.value, subject=claims.sub, project=claims.project,
                          scopes=claims.scope)
    return Caller(principal, principal_label(claims), claims.jti, claims)


async def bearer_caller(request: web.Request, services: Services, surface: Surface) -> Caller:
    """The caller the Authorization header's bearer token names."""
    return token_caller(await services.authenticator.authenticate(bearer_token(request), surface))


async def request_caller(request: web.Request, services: Services, surface: Surface) -> Caller:
    """A route's usual caller: the bearer token, else the console session the cookie names
    (``controlplane.console.auth``), which acts as the token it was signed in with."""
    if "Authorization" in request.headers or not console.has_cookie(request):
        return await bearer_caller(request, services, surface)
    return await console_caller(request, services, surface)


async def console_caller(request: web.Request, services: Services, surface: Surface) -> Caller:
    """The console session the cookie names, acting as its token; the audit names it so."""
    caller = token_caller(await console.cookie_claims(request, services, surface))
    return dataclasses.replace(caller, label=f"{caller.label} via console")


def principal_label(claims: Claims) -> str:
    """Who acted, for the audit record: kind, project, subject and the token id (never the
    token)."""
    project = f"@{claims.project}" if claims.project else ""
    return f"{claims.kind.value}:{claims.sub}{project}#{claims.jti}"


def redact(path: str) -> str:
    """``path`` with every token-shaped segment replaced: a token pasted into a URL is never
    written to a log line or an audit record."""
    return "/".join(REDACTED if _TOKEN_SHAPED.fullmatch(segment) else segment
                    for segment in path.split("/"))


def resource_label(resource: Resource) -> str:
    parts = [resource.kind] + [part for part in (resource.project, resource.name) if part]
    return redact("/".join(parts))


class Gate:
    """The authorization steps of one request, each decision audited before it takes effect."""

    def __init__(self, services: Services, request: web.Request, spec: RouteSpec) -> None:
        self._services = services
        self._request = request
        self._spec = spec
        self._action = spec.action or ""

    async def admit(self) -> Caller:
        caller = await self._authenticate()
        self._action = caller.action or self._action
        await self._rate_limit(caller)
        await self._decide(caller)
        return caller

    async def _resource(self, claims: Claims | None) -> Resource:
        if self._spec.resource is None:  # create_app refuses such routes; fail closed anyway
            raise ControlPlaneError("route declares no resource")
        resource = self._spec.resource(self._request, claims)
        return await resource if inspect.isawaitable(resource) else resource

    async def _audit(self, principal: str, resource: Resource, allowed: bool, rule: str) -> None:
        decision: Literal["allow", "deny"] = "allow" if allowed else "deny"
        # The record comes first: if it cannot be written, this raises Unavailable and nothing runs.
        await self._services.audit.record(
            principal=principal, action=self._action, resource=resource_label(resource),
            decision=decision, rule=rule, request_id=self._request[REQUEST_ID])
        self._count(decision, rule)

    async def _audit_refusal(self, principal: str, resource: Resource, rule: str) -> None:
        """A refusal a flood could repeat: summarised per principal and window in the log."""
        await self._services.audit.record_denial(
            principal=principal, action=self._action, resource=resource_label(resource),
            rule=rule, request_id=self._request[REQUEST_ID])
        self._count("deny", rule)

    def _count(self, decision: str, rule: str) -> None:
        # Rules, token failure reasons included, form a small fixed set: a safe label.
        self._services.metrics.decisions.labels(self._action, decision, rule).inc()

    async def _authenticate(self) -> Caller:
        services = self._services
        surface = services.surface(self._spec.kinds)
        try:
            credentials = self._spec.credentials or request_caller
            return await credentials(self._request, services, surface)
        except TokenError as exc:
            await self._refuse_unauthenticated(self._anonymous(), f"token:{exc.reason}")
            raise
        except UnmappedIdentity as exc:  # verified, so named; but nothing lets it in
            self._action = exc.action
            await self._refuse_unauthenticated(exc.principal, exc.rule)
            raise
        except CsrfRefused:  # a cross-site request riding a console cookie
            await self._refuse_unauthenticated(self._anonymous(), "csrf")
            raise
        except InvalidRequest:  # a credential-bearing body refused before anyone is known
            await self._refuse_unauthenticated(self._anonymous(), "request:invalid")
            raise

    def _anonymous(self) -> str:
        return f"{ANONYMOUS}@{self._request[CLIENT]}"

    async def _refuse_unauthenticated(self, principal: str, rule: str) -> None:
        """Audit a request refused before it was admitted, counting it against its client
        address's allowance (RateLimited once that is spent)."""
        resource = await self._resource(None)
        try:
            await self._services.limiter.check_unauthenticated(self._request[CLIENT])
        except RateLimited:
            await self._audit_refusal(principal, resource, "rate-limit")
            raise
        await self._audit_refusal(principal, resource, rule)

    async def _rate_limit(self, caller: Caller) -> None:
        try:
            await self._services.limiter.check(caller.rate_key, caller.principal.project)
        except RateLimited:
            await self._audit_refusal(caller.label, await self._resource(caller.claims),
                                      "rate-limit")
            raise

    async def _decide(self, caller: Caller) -> None:
        resource = await self._resource(caller.claims)
        decision: Decision = self._services.policies.current.decide(caller.principal,
                                                                    self._action, resource)
        await self._audit(caller.label, resource, decision.allowed, decision.rule)
        if not decision.allowed:
            raise PermissionDenied(decision.reason or "the policy denies this action",
                                   rule=decision.rule)


def route_spec(request: web.Request) -> RouteSpec | None:
    """The declared spec of the matched route; None for aiohttp's own 404/405 answers."""
    route = request.match_info.route
    spec = request.app[ROUTE_SPECS].get(route)
    if spec is None and not isinstance(route, SystemRoute):
        # A route registered outside the route table has no declared checks: refuse, don't guess.
        raise ControlPlaneError("route is not declared")
    return spec


@web.middleware
async def paths(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse, as a path no route serves, a path parameter outside its bounds."""
    if not all(valid(name, value) for name, value in request.match_info.items()):
        raise web.HTTPNotFound()
    return await handler(request)


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    spec = route_spec(request)
    if spec is not None and not spec.public:
        caller = await Gate(request.app[SERVICES], request, spec).admit()
        request[CALLER] = caller
        if caller.claims is not None:
            request[CLAIMS] = caller.claims
    return await handler(request)


MIDDLEWARES: Final[tuple[Middleware, ...]] = (observe, problems, paths, authorize)
