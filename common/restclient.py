"""The one JSON client for the control plane's REST API: producers, consumers and admin commands.

Blocking calls on the standard library's ``urllib``: producers and consumer ranks are not event
loops, and each call is one small JSON request. Every failure is a ``RestError`` naming the call,
the HTTP status and the control plane's own explanation (its problem+json ``title``, ``detail``,
field ``errors`` and ``request_id``), and its ``Retry-After``. The bearer token travels only in the
``Authorization`` header and is never part of a message, a ``repr`` or a log record.

The errors form one tree, so a caller catches as much or as little as it means to::

    ClientError                 anything a control-plane client raises on purpose
    └── RestError               a call failed: .status (None: no usable answer), .title, .detail,
        │                       .errors, .request_id, .retry_after_s
        ├── Unreachable         no answer (refused, timed out, reset)
        ├── MalformedAnswer     an answer that is not what the API promises
        ├── BadRequest          400: the request's fields (.errors names them)
        ├── Unauthorized        401: a token that is missing, invalid, expired or revoked
        ├── Forbidden           403: the policy refused (another project's session, a scope)
        ├── NotFound            404
        ├── Conflict            409: the state does not allow it (a quota, an ended session)
        ├── RateLimited         429: ask again after .retry_after_s
        └── ServiceError        5xx
            └── ServiceUnavailable  503: store or audit log unavailable; nothing was done
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import Message
from typing import Any, Final, TypeVar

from common.errors import DsnError

T = TypeVar("T")
# Long enough for a control plane under load, short enough that a caller never looks hung.
REQUEST_TIMEOUT_S = 10.0
REQUEST_ID_HEADER = "X-Request-ID"
# The longest Retry-After a retry waits out; a service asking for longer is answered with its
# refusal, so that a caller never blocks for minutes inside one call.
MAX_RETRY_AFTER_S: Final = 30.0


class ClientError(DsnError):
    """The root of everything a control-plane client raises on purpose."""


class RestError(ClientError):
    """A control-plane call failed; ``status`` is the HTTP status (None: no usable answer).

    ``title``, ``detail``, ``errors`` (``[{field, message}]``) and ``request_id`` come from the
    problem+json answer when there is one; ``retry_after_s`` from its ``Retry-After`` header.
    ``retryable`` marks the failures worth another attempt: no answer, 429 and 5xx; a 4xx is a
    refusal that asking again would not change.
    """

    def __init__(self, message: str, status: int | None, *, title: str = "", detail: str = "",
                 errors: tuple[tuple[str, str], ...] = (), request_id: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


class Unreachable(RestError):
    """No answer: the control plane refused the connection, timed out or reset it."""


class MalformedAnswer(RestError):
    """An answer that is not what the API promises (not JSON, a field missing or mistyped)."""


class BadRequest(RestError):
    """400: the request itself is wrong; ``errors`` names the fields."""


class Unauthorized(RestError):
    """401: the token is missing, invalid, expired or revoked."""


class Forbidden(RestError):
    """403: the policy refused the action (another project's resource, a missing scope)."""


class NotFound(RestError):
    """404: no such session, job, scan result, ..."""


class Conflict(RestError):
    """409: the current state does not allow it (a full quota, an ended session, a used key)."""


class RateLimited(RestError):
    """429: too many requests; ``retry_after_s`` says when asking again may succeed."""


class ServiceError(RestError):
    """5xx: the control plane failed to do it."""


class ServiceUnavailable(ServiceError):
    """503: the store or the audit log is unavailable; nothing was done."""


# The class of a refusal by status; other statuses are plain RestErrors (5xx: ServiceError).
_BY_STATUS: Final[dict[int, type[RestError]]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    429: RateLimited, 503: ServiceUnavailable,
}


def _error_class(status: int) -> type[RestError]:
    return _BY_STATUS.get(status, ServiceError if status >= 500 else RestError)


def check_base_url(url: str) -> None:
    """Refuse (ValueError) a control plane URL that is not ``http(s)://HOST:PORT``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"control plane URL {url!r} is not http(s)://HOST:PORT")


def quote(segment: str) -> str:
    """One URL path segment, with every reserved character escaped."""
    return urllib.parse.quote(segment, safe="")


def call_json(base_url: str, token: str, method: str, path: str, body: dict[str, Any] | None,
              *, headers: dict[str, str] | None = None,
              timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """``method path`` with ``body`` as JSON and any extra ``headers`` (``If-Match`` ...); the
    answer's JSON object (``{}`` for no body)."""
    headers = {**(headers or {}), "Authorization": f"Bearer {token}",
               "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, headers=headers,
                                     method=method)
    what = f"{method} {path}"
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return _json_object(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raise _problem_error(what, exc.code, exc.read(), exc.headers) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise Unreachable(f"{what}: cannot reach the control plane at {base_url}: {reason}",
                          None) from None


def is_retryable(exc: Exception) -> bool:
    """True for a RestError that says it is worth another attempt."""
    return isinstance(exc, RestError) and exc.retryable


def with_retries(call: Callable[[], T], *, attempts: int = 4, first_delay_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep,
                 retry_if: Callable[[Exception], bool] = is_retryable) -> T:
    """``call()``, tried again after 0.5 s, 1 s, 2 s, ... while it fails with ``retry_if``.

    A refusal with ``Retry-After`` (429, 503) is asked again no sooner than it says; one asking
    for more than ``MAX_RETRY_AFTER_S`` is raised at once rather than waited out.
    """
    delay = first_delay_s
    for _ in range(attempts - 1):
        try:
            return call()
        except Exception as exc:
            after = exc.retry_after_s if isinstance(exc, RestError) else None
            if not retry_if(exc) or (after or 0.0) > MAX_RETRY_AFTER_S:
                raise
            sleep(max(delay, after or 0.0))
        delay *= 2
    return call()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        raise MalformedAnswer("the control plane answered with something other than JSON",
                              None) from None
    if not isinstance(value, dict):
        raise MalformedAnswer("the control plane answered with JSON that is not an object", None)
    return value


def _retry_after(headers: Message) -> float | None:
    """``Retry-After`` in seconds (the delay form; a date or garbage counts as absent)."""
    text = (headers.get("Retry-After") or "").strip()
    return float(text) if text.isascii() and text.isdigit() else None


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


def _field(error: dict[str, Any]) -> str:
    """The field an error names, with the line of the file at fault when it gives one (a
    template's errors do)."""
    line = error.get("line")
    return f"{error.get('field', '')}" + (f" (line {line})" if type(line) is int else "")


def _problem_error(what: str, status: int, raw: bytes, headers: Message) -> RestError:
    """A RestError from a refusal, of the class its status names: the problem+json fields, or the
    body's text if it is not one."""
    cls, retry_after = _error_class(status), _retry_after(headers)
    header_id = headers.get(REQUEST_ID_HEADER)
    try:
        problem = json.loads(raw)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        text = _one_line(raw.decode(errors="replace")) or "(no explanation)"
        return cls(f"{what}: {status} {text}", status, detail=text, request_id=header_id,
                   retry_after_s=retry_after)
    title, detail = _one_line(str(problem.get("title") or "")), _one_line(str(
        problem.get("detail") or ""))
    errors = tuple((_one_line(_field(e), 100), _one_line(str(e.get("message", ""))))
                   for e in problem.get("errors") or [] if isinstance(e, dict))
    request_id = str(problem.get("request_id") or header_id or "") or None
    message = f"{what}: {status} {detail or title or '(no explanation)'}"
    if errors:
        message += " [" + "; ".join(f"{field}: {text}" for field, text in errors) + "]"
    if request_id:
        message += f" (request id {request_id})"
    return cls(message, status, title=title, detail=detail, errors=errors,
               request_id=request_id, retry_after_s=retry_after)
