"""The console's sign-in: a token presented once, a cookie after.

Signing in presents an admin or project token as a bearer token, once; the control plane keeps the
token's verified claims in a server-side session (``controlplane.store.console``) and answers with
a cookie carrying a random secret: ``HttpOnly`` (no script reads it), ``SameSite=Strict``,
``Path=/``, and ``Secure`` under the ``__Host-`` prefix when the service is reached over TLS.
The browser never holds the token after that, in any storage a script can read.

Every API request that carries no ``Authorization`` header but the cookie acts as that token: the
same surface, policy, rate limit and audit as the bearer token would get, the token checked again
each time (expiry, revocation, its project, its admin), so revoking the token ends the console
session at its next request. A state change (any method but GET/HEAD) must also carry the
session's CSRF token in ``X-CSRF-Token``, and, where the browser names an ``Origin``, come from
this service's own origin. The CSRF token is derived from the cookie's secret, so it names one
session and needs no storage; the page reads it from ``GET /ui/session``, which another origin
cannot read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from aiohttp import web

from controlplane.errors import CsrfRefused, MissingToken, SignedOut
from controlplane.store import console as repo
from controlplane.tokens import Claims, Surface, TokenKind, typed_claims

if TYPE_CHECKING:
    from controlplane.middlewares import Services

COOKIE: Final = "dsn_console"
# Over TLS: the prefix makes browsers refuse the cookie unless Secure, Path=/ and host-only.
SECURE_COOKIE: Final = "__Host-dsn_console"
CSRF_HEADER: Final = "X-CSRF-Token"
CONSOLE_KINDS: Final = frozenset({TokenKind.ADMIN, TokenKind.PROJECT})
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 random bytes, base64url without padding


def _digest(purpose: bytes, secret: str) -> bytes:
    return hashlib.sha256(purpose + b"\0" + secret.encode()).digest()


def session_id(secret: str) -> str:
    """What the store keys a session by: never the secret itself."""
    return _digest(b"dsn-console-session", secret).hex()


def csrf_token(secret: str) -> str:
    return base64.urlsafe_b64encode(_digest(b"dsn-console-csrf", secret)).rstrip(b"=").decode()


def cookie_secret(request: web.Request) -> str | None:
    """The secret of the request's console cookie, if it carries one of the right shape."""
    for name in (SECURE_COOKIE, COOKIE):
        value = request.cookies.get(name)
        if value is not None:
            return value if _SECRET.match(value) else None
    return None


def has_cookie(request: web.Request) -> bool:
    return SECURE_COOKIE in request.cookies or COOKIE in request.cookies


def served_over_tls(request: web.Request, services: Services) -> bool:
    return request.secure or urlsplit(services.settings.public_base_url).scheme == "https"


def _same_origin(request: web.Request, services: Services) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser's cross-origin request; the CSRF token still must match
    own = {str(request.url.origin()), _origin(services.settings.public_base_url)}
    return origin in own


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check_origin(request: web.Request, services: Services) -> None:
    if not _same_origin(request, services):
        raise CsrfRefused("the request comes from another origin")


def _check_csrf(request: web.Request, services: Services, secret: str) -> None:
    check_origin(request, services)
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), csrf_token(secret).encode()):
        raise CsrfRefused(f"a console request that changes state needs the session's "
                          f"{CSRF_HEADER} header")


async def cookie_claims(request: web.Request, services: Services, surface: Surface) -> Claims:
    """The claims of the console session the request's cookie names, checked as if its token
    came with the request; a state change must also pass the CSRF check."""
    secret = cookie_secret(request)
    if secret is None:
        raise MissingToken("an Authorization: Bearer token or a console sign-in is required")
    live = await live_session(services, secret)
    if live is None:
        raise SignedOut("the console session has ended or expired: sign in again")
    if request.method not in SAFE_METHODS:
        _check_csrf(request, services, secret)
    return await services.authenticator.recheck(typed_claims(live[0]), surface)


async def live_session(services: Services, secret: str) -> tuple[dict[str, object], float] | None:
    """The stored claims and expiry of the session ``secret`` opened, if it is still live."""
    return await repo.live_session(services.store, session_id(secret), services.now())


async def open_session(services: Services, claims: Claims) -> tuple[str, float]:
    """A new session for ``claims``: its cookie secret and when it expires."""
    secret = secrets.token_urlsafe(32)
    now = services.now()
    expires_at = min(float(claims.exp), now + services.settings.console_session_s)
    await repo.insert_session(services.store, session_id(secret), claims.to_payload(),
                              claims.jti, now, expires_at)
    return secret, expires_at


async def end_session(request: web.Request, services: Services) -> None:
    secret = cookie_secret(request)
    if secret is not None:
        await repo.end_session(services.store, session_id(secret), services.now())


def set_cookie(response: web.StreamResponse, secret: str, expires_at: float, now: float, *,
               tls: bool) -> None:
    response.set_cookie(SECURE_COOKIE if tls else COOKIE, secret, max_age=int(expires_at - now),
                        path="/", secure=tls, httponly=True, samesite="Strict")


def clear_cookies(response: web.StreamResponse) -> None:
    for name in (SECURE_COOKIE, COOKIE):
        response.del_cookie(name, path="/", secure=name == SECURE_COOKIE, httponly=True,
                            samesite="Strict")
