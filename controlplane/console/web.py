"""The console's routes: its page and static files (public: they hold no data), and the sign-in
session (``POST``/``GET``/``DELETE /ui/session``). Everything else the page shows or changes it
asks of the REST API, with the cookie standing for the token (``controlplane.console.auth``).

Every response of the service carries a strict Content-Security-Policy: scripts, styles, images
and requests from this origin only, no inline script or style, no framing, no plugins, forms
posting nowhere else; so injected markup could neither run nor send anything away.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from aiohttp import web

from controlplane import schemas as s
from controlplane.console import auth
from controlplane.errors import NotFound, SignedOut
from controlplane.middlewares import (
    CLAIMS,
    SERVICES,
    RouteSpec,
    bearer_caller,
    console_caller,
)
from controlplane.policy import Resource
from controlplane.tokens import Claims
from controlplane.views import reply

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
SESSION_PATH: Final = "/ui/session"
CONTENT_SECURITY_POLICY: Final = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'",
    "connect-src 'self'", "font-src 'self'", "form-action 'self'", "frame-ancestors 'none'",
    "base-uri 'none'", "object-src 'none'"))
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
NO_STORE: Final = {"Cache-Control": "no-store"}


def _static_files(root: Path) -> Mapping[str, Path]:
    """Every file shipped in ``static/``, by name: the only names served, so no request path is
    ever joined to the file system."""
    return {path.name: path for path in sorted(root.iterdir()) if path.is_file()}


STATIC_FILES: Final = _static_files(STATIC_DIR)


async def security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def page(_request: web.Request) -> web.Response:
    return _file("index.html")


async def static(request: web.Request) -> web.Response:
    return _file(request.match_info["file"])


def _file(name: str) -> web.Response:
    path = STATIC_FILES.get(name)
    if path is None:
        raise NotFound(f"no console file {name!r}")
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    charset = "utf-8" if content_type.startswith("text/") or name.endswith(".js") else None
    # Revalidated on every load: an upgraded service never runs yesterday's script.
    return web.Response(body=path.read_bytes(), content_type=content_type, charset=charset,
                        headers={"Cache-Control": "no-cache"})


def _session_out(claims: Claims, expires_at: float, secret: str) -> s.ConsoleSession:
    return s.ConsoleSession(kind=claims.kind.value, subject=claims.sub, project=claims.project,
                            scope=" ".join(sorted(claims.scope)), expires_at=s.utc(expires_at),
                            csrf_token=auth.csrf_token(secret))


async def sign_in(request: web.Request) -> web.Response:
    services, claims = request.app[SERVICES], request[CLAIMS]
    auth.check_origin(request, services)  # nobody signs a browser in from another site
    secret, expires_at = await auth.open_session(services, claims)
    response = reply(_session_out(claims, expires_at, secret), 201, NO_STORE)
    auth.set_cookie(response, secret, expires_at, services.now(),
                    tls=auth.served_over_tls(request, services))
    return response


async def show_session(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    secret = auth.cookie_secret(request)
    live = await auth.live_session(services, secret) if secret else None
    if secret is None or live is None:  # ended since console_caller admitted the request
        raise SignedOut("the console session has ended or expired: sign in again")
    return reply(_session_out(request[CLAIMS], live[1], secret), headers=NO_STORE)


async def sign_out(request: web.Request) -> web.Response:
    await auth.end_session(request, request.app[SERVICES])
    response = web.Response(status=204, headers=NO_STORE)
    auth.clear_cookies(response)
    return response


def _console(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="console", project=claims.project if claims else None, name=None)


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", "/ui", page, "The web console", None, tag="console",
              response_content_type="text/html"),
    RouteSpec("GET", "/ui/static/{file}", static, "The web console's scripts and styles",
              None, tag="console", response_content_type="text/*",
              extra_responses=(404,)),
    RouteSpec("POST", SESSION_PATH, sign_in, "Sign in to the web console with an admin or "
              "project token (as Bearer): sets the session cookie", s.ConsoleSession, 201,
              "console:sign_in", auth.CONSOLE_KINDS, _console, tag="console",
              credentials=bearer_caller, response_headers=("Set-Cookie", "Cache-Control")),
    RouteSpec("GET", SESSION_PATH, show_session, "The console session the cookie names, with its "
              "CSRF token", s.ConsoleSession, 200, "console:session", auth.CONSOLE_KINDS,
              _console, tag="console", credentials=console_caller,
              response_headers=("Cache-Control",)),
    RouteSpec("DELETE", SESSION_PATH, sign_out, "Sign out of the web console: the session ends "
              "and its cookie is cleared", None, 204, "console:sign_out", auth.CONSOLE_KINDS,
              _console, tag="console", credentials=console_caller,
              response_headers=("Set-Cookie",)),
)
