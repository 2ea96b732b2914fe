"""The one JSON client for the control plane's REST API: producers, consumers and admin commands.

Blocking calls on the standard library's ``urllib``: producers and consumer ranks are not event
loops, and each call is one small JSON request. Every failure is a ``RestError`` naming the call,
the HTTP status and the control plane's own explanation (its problem+json ``title``, ``detail``,
field ``errors`` and ``request_id``), and its ``Retry-After``. The bearer token travels only in the
``Authorization`` header and is never part of a message, a ``repr`` or a log record.

A control plane that runs as several replicas on one database is named by all their URLs
(``Replicas``, parsed from ``http://a:8750,http://b:8750``): a call goes to the replica in use and,
when no connection to it can be made, to the next one at once; the replica that answers is the one
used from then on.

The errors form one tree, so a caller catches as much or as little as it means to::

    ClientError                 anything a control-plane client raises on purpose
    └── RestError               a call failed: .status (None: no usable answer), .title, .detail,
        │                       .errors, .request_id, .retry_after_s
        ├── Unreachable         no answer (refused, timed out, reset)
        │   └── NotConnected    no connection: nothing of the request reached the service
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


class NotConnected(Unreachable):
    """No connection could be made (refused, no such host, the connect timed out): nothing of
    the request reached the control plane, so sending it to another replica cannot do it twice."""


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
    if not _is_base_url(url):
        raise ValueError(f"control plane URL {url!r} is not http(s)://HOST:PORT")


def _is_base_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, a bracketed host that is not an address
        return False
    # No comma or space: a list of URLs given where one is expected is refused, not mangled.
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0
            and not any(c.isspace() or c == "," for c in url))


def parse_base_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """The control plane's base URLs from a comma-separated list (``http://a:8750,http://b:8750``)
    or a sequence of URLs, each checked by ``check_base_url``; ValueError for an empty list or
    item, or a URL given twice."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    given = ", ".join(items) if not isinstance(urls, str) else urls
    if not given.strip():
        raise ValueError("no control plane URL given")
    parsed: list[str] = []
    for item in items:
        url = item.strip().rstrip("/")
        if not url:
            raise ValueError(f"control plane URL list {given!r} has an empty item")
        check_base_url(url)
        if base_url_key(url) in map(base_url_key, parsed):
            raise ValueError(f"control plane URL {url!r} is listed twice")
        parsed.append(url)
    return tuple(parsed)


def base_url_key(url: str) -> tuple[str, str, int | None, str]:
    """What two spellings of one base URL share (``HTTP://Host:1/`` and ``http://host:1``)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port, parts.path.rstrip("/")


class Replicas:
    """The control plane's replicas, by base URL in the order they are tried; one is in use.

    A call goes to the replica in use. When no connection to it can be made (``NotConnected``:
    nothing of the request reached it) the call goes to the next replica at once, and so on
    around the list; the replica that answers, with whatever status, is the one in use from then
    on, so that a healthy replica is not probed again on every call. A call that reached a
    replica and got no answer (timed out, reset) moves on only for an idempotent method (RFC
    9110: GET, HEAD, OPTIONS, PUT, DELETE); a POST may have been acted on, and is raised as is
    rather than replayed at another replica. Whether to ask again is ``with_retries``'s choice,
    at the replica in use (see there). When every replica fails, the error names each.
    """

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = parse_base_urls(urls)
        self._in_use = 0

    @property
    def url(self) -> str:
        """The base URL of the replica in use: the one a call reached last."""
        return self.urls[self._in_use]

    def __repr__(self) -> str:
        return f"Replicas({','.join(self.urls)!r}, in use: {self.url!r})"

    def call(self, what: str, attempt: Callable[[str], T], *, idempotent: bool) -> T:
        """``attempt(base_url)`` at the replica in use, then at the next while it fails as the
        class says; ``what`` names the call in the error of every replica failing."""
        failures: list[tuple[str, Unreachable]] = []
        count = len(self.urls)
        for index in [(self._in_use + step) % count for step in range(count)]:
            try:
                result = attempt(self.urls[index])
            except NotConnected as exc:
                failures.append((self.urls[index], exc))
                continue
            except Unreachable as exc:
                self._in_use = index
                if not idempotent:
                    raise
                failures.append((self.urls[index], exc))
                continue
            except RestError:
                self._in_use = index
                raise
            self._in_use = index
            return result
        raise _all_failed(what, failures)

    def call_json(self, token: str, method: str, path: str, body: dict[str, Any] | None, *,
                  headers: dict[str, str] | None = None,
                  timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """``call_json`` at the replicas, failing over as the class says."""
        return self.call(
            f"{method} {path}",
            lambda url: call_json(url, token, method, path, body, headers=headers,
                                  timeout_s=timeout_s),
            idempotent=method.upper() in IDEMPOTENT_METHODS)


IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _all_failed(what: str, failures: list[tuple[str, Unreachable]]) -> Unreachable:
    if len(failures) == 1:
        return failures[0][1]
    cls = NotConnected if all(isinstance(e, NotConnected) for _, e in failures) else Unreachable
    reasons = "; ".join(f"{url} ({exc.detail})" for url, exc in failures)
    return cls(f"{what}: cannot reach the control plane at any of its {len(failures)} replicas: "
               f"{reasons}", None, detail=reasons)


def quote(segment: str) -> str:
    """One URL path segment, with every reserved character escaped."""
    return urllib.parse.quote(segment, safe="")


def call_json(base_url: str, token: str, method: str, path: str, body: dict[str, Any] | None,
              *, headers: dict[str, str] | None = None,
              timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """``method path`` at the one control plane ``base_url``, with ``body`` as JSON and any extra
    ``headers`` (``If-Match`` ...); the answer's JSON object (``{}`` for no body). ``Replicas``
    calls it at each replica in turn."""
    headers = {**(headers or {}), "Authorization": f"Bearer {token}",
               "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    answer = send(base_url, method, path, data, headers, timeout_s=timeout_s)
    if not answer.ok:
        raise _problem_error(f"{method} {path}", answer.status, answer.body, answer.headers)
    return _json_object(answer.body)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, whatever its status."""

    status: int
    body: bytes
    headers: Message

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def send(base_url: str, method: str, path: str, data: bytes | None, headers: dict[str, str], *,
         timeout_s: float = REQUEST_TIMEOUT_S) -> Answer:
    """One request at the one control plane ``base_url``: its answer, a refusal included;
    ``NotConnected`` when no connection could be made, ``Unreachable`` when one was and no
    answer came. ``call_json`` is built on it, as is a caller whose answers have a form of their
    own (``dsn login``'s OAuth ones), each at ``Replicas.call``."""
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, headers=headers,
                                     method=method)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return Answer(response.status, response.read(), response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, exc.read(), exc.headers)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        cls = NotConnected if isinstance(reason, _ConnectFailed) else Unreachable
        raise cls(f"{method} {path}: cannot reach the control plane at {base_url}: {reason}",
                  None, detail=str(reason)) from None


class _ConnectFailed(OSError):
    """The connection could not be made: nothing of the request was sent."""


def _connecting(connect: Callable[[], None]) -> None:
    try:
        connect()
    except OSError as exc:
        raise _ConnectFailed(str(exc)) from exc


# urllib reports a failed connect and a failure after the request was sent alike (URLError);
# connections that mark their own connect's failure tell them apart, which decides whether a
# request may go to another replica.
class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        _connecting(super().connect)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        _connecting(super().connect)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req)


_OPENER: Final = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def is_retryable(exc: Exception) -> bool:
    """True for a RestError that says it is worth another attempt."""
    return isinstance(exc, RestError) and exc.retryable


def with_retries(call: Callable[[], T], *, attempts: int = 4, first_delay_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep,
                 retry_if: Callable[[Exception], bool] = is_retryable) -> T:
    """``call()``, tried again after 0.5 s, 1 s, 2 s, ... while it fails with ``retry_if``.

    A refusal with ``Retry-After`` (429, 503) is asked again no sooner than it says; one asking
    for more than ``MAX_RETRY_AFTER_S`` is raised at once rather than waited out.

    A call through ``Replicas`` is asked again at the replica in use: the one that failed to
    answer, unless it now refuses connections. ``is_retryable`` counts a timeout or a reset as
    worth another attempt whatever the method, as it did before there were replicas; a caller
    for which a second POST is wrong passes a ``retry_if`` that refuses ``Unreachable`` but not
    ``NotConnected``.
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
