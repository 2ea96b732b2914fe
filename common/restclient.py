"""The one JSON client for the control plane's REST API: producers, consumers and admin commands.

Blocking calls on the standard library's ``urllib``: producers and consumer ranks are not event
loops, and each call is one small JSON request. Every failure is a ``RestError`` naming the call,
the HTTP status and the control plane's own explanation (its problem+json ``title``, ``detail``,
field ``errors`` and ``request_id``). The bearer token travels only in the ``Authorization`` header
and is never part of a message, a ``repr`` or a log record.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from common.errors import DsnError

T = TypeVar("T")
# Long enough for a control plane under load, short enough that a caller never looks hung.
REQUEST_TIMEOUT_S = 10.0
REQUEST_ID_HEADER = "X-Request-ID"


class RestError(DsnError):
    """A control-plane call failed; ``status`` is the HTTP status (None: no usable answer).

    ``title``, ``detail``, ``errors`` (``[{field, message}]``) and ``request_id`` come from the
    problem+json answer when there is one. ``retryable`` marks the failures worth another attempt:
    no answer, 429 and 5xx; a 4xx is a refusal that asking again would not change.
    """

    def __init__(self, message: str, status: int | None, *, title: str = "", detail: str = "",
                 errors: tuple[tuple[str, str], ...] = (), request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


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
            raise _problem_error(what, exc.code, exc.read(),
                                 exc.headers.get(REQUEST_ID_HEADER)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise RestError(f"{what}: cannot reach the control plane at {base_url}: {reason}",
                        None) from None


def is_retryable(exc: Exception) -> bool:
    """True for a RestError that says it is worth another attempt."""
    return isinstance(exc, RestError) and exc.retryable


def with_retries(call: Callable[[], T], *, attempts: int = 4, first_delay_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep,
                 retry_if: Callable[[Exception], bool] = is_retryable) -> T:
    """``call()``, tried again after 0.5 s, 1 s, 2 s, ... while it fails with ``retry_if``."""
    delay = first_delay_s
    for _ in range(attempts - 1):
        try:
            return call()
        except Exception as exc:
            if not retry_if(exc):
                raise
        sleep(delay)
        delay *= 2
    return call()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        raise RestError("the control plane answered with something other than JSON",
                        None) from None
    if not isinstance(value, dict):
        raise RestError("the control plane answered with JSON that is not an object", None)
    return value


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


def _problem_error(what: str, status: int, raw: bytes, header_id: str | None) -> RestError:
    """A RestError from a refusal: the problem+json fields, or the body's text if it is not one."""
    try:
        problem = json.loads(raw)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        text = _one_line(raw.decode(errors="replace")) or "(no explanation)"
        return RestError(f"{what}: {status} {text}", status, detail=text, request_id=header_id)
    title, detail = _one_line(str(problem.get("title") or "")), _one_line(str(
        problem.get("detail") or ""))
    errors = tuple((_one_line(str(e.get("field", "")), 100), _one_line(str(e.get("message", ""))))
                   for e in problem.get("errors") or [] if isinstance(e, dict))
    request_id = str(problem.get("request_id") or header_id or "") or None
    message = f"{what}: {status} {detail or title or '(no explanation)'}"
    if errors:
        message += " [" + "; ".join(f"{field}: {text}" for field, text in errors) + "]"
    if request_id:
        message += f" (request id {request_id})"
    return RestError(message, status, title=title, detail=detail, errors=errors,
                     request_id=request_id)
