"""The consumer's side of the control plane's REST API: register, heartbeat, leave, report.

Blocking calls on the standard library's ``urllib``: a consumer rank is not an event loop, and each
call is one small JSON request. Every failure is a ``ControlPlaneError`` naming the call and the
control plane's own explanation (the ``detail`` of its problem+json answer). The token travels only
in the ``Authorization`` header and is never part of a message or a log record.
"""

from __future__ import annotations

import http.client
import json
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from dataplane.consumer.errors import ControlPlaneError, SetupError

T = TypeVar("T")
# Long enough for a control plane under load, short enough that a rank never looks hung.
REQUEST_TIMEOUT_S = 10.0
MAX_TOKEN_BYTES = 16 * 1024


def read_token(path: Path) -> str:
    """The consumer token from ``path``, which must be a regular file only its owner can read."""
    try:
        info = path.stat()
    except OSError as exc:
        raise SetupError(f"token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SetupError(f"token file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise SetupError(f"token file {path} is readable by others (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    if info.st_size > MAX_TOKEN_BYTES:
        raise SetupError(f"token file {path} is {info.st_size} bytes; a token is far smaller")
    token = path.read_text(encoding="ascii", errors="replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise SetupError(f"token file {path} does not hold one token")
    return token


@dataclass(frozen=True)
class Registration:
    """What a rank tells the control plane about itself."""

    endpoint: str
    rank: int
    job_id: str
    host: str


@dataclass(frozen=True)
class Lease:
    """A registered consumer and how long its lease lasts (both times from the control plane)."""

    consumer_id: str
    registered_at: datetime
    expires_at: datetime

    @property
    def seconds(self) -> float:
        return (self.expires_at - self.registered_at).total_seconds()

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> Lease:
        try:
            return cls(str(answer["id"]), datetime.fromisoformat(answer["registered_at"]),
                       datetime.fromisoformat(answer["lease_expires_at"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ControlPlaneError(f"the control plane's consumer record is malformed: {exc!r}",
                                    None) from None


@dataclass(frozen=True)
class ControlPlaneClient:
    """The control plane at ``base_url`` (``http://HOST:PORT``), called with a consumer token."""

    base_url: str
    token: str = field(repr=False)
    timeout_s: float = REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SetupError(f"control plane URL {self.base_url!r} is not http(s)://HOST:PORT")

    def register(self, session: str, me: Registration) -> Lease:
        answer = self._call("POST", f"{_session_path(session)}/consumers", {
            "endpoint": me.endpoint, "rank": me.rank, "job_id": me.job_id, "host": me.host})
        return Lease.from_answer(answer)

    def heartbeat(self, session: str, consumer_id: str) -> Lease:
        path = f"{_session_path(session)}/consumers/{_quote(consumer_id)}"
        return Lease.from_answer(self._call("PUT", path, None))

    def leave(self, session: str, consumer_id: str) -> None:
        self._call("DELETE", f"{_session_path(session)}/consumers/{_quote(consumer_id)}", None)

    def report(self, session: str, scan: int, result: dict[str, Any]) -> None:
        self._call("POST", f"{_session_path(session)}/scans/{scan}/result", result)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base_url.rstrip("/") + path, data=data,
                                         headers=headers, method=method)
        what = f"{method} {path}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return _json_object(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise ControlPlaneError(f"{what}: {exc.code} {_problem(exc.read())}",
                                        exc.code) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise ControlPlaneError(f"{what}: no answer from {self.base_url}: {reason}",
                                    None) from None


def with_retries(call: Callable[[], T], *, attempts: int = 4, first_delay_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried again after 0.5 s, 1 s, 2 s, ... while it fails in a retryable way."""
    delay = first_delay_s
    for _ in range(attempts - 1):
        try:
            return call()
        except ControlPlaneError as exc:
            if not exc.retryable:
                raise
        sleep(delay)
        delay *= 2
    return call()


def _session_path(session: str) -> str:
    return f"/api/v1/sessions/{_quote(session)}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        raise ControlPlaneError("the control plane answered with something other than JSON",
                                None) from None
    if not isinstance(value, dict):
        raise ControlPlaneError("the control plane answered with JSON that is not an object", None)
    return value


def _problem(raw: bytes) -> str:
    """The ``detail`` (or ``title``) of a problem+json body, on one line."""
    try:
        problem = json.loads(raw)
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        text = str(problem.get("detail") or problem.get("title") or "")
    else:
        text = raw.decode(errors="replace")
    return " ".join(text.split())[:500] or "(no explanation)"
