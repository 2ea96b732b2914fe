"""The facility client: a project token's whole view of the control plane, as a Python API.

A producer, a script or a notebook holding a project token opens a streaming session, launches its
consumer job, waits for the job's ranks, streams (``dataplane.producer.ProducerSession`` takes this
client), waits for the scan's result and reads its file path and SHA-256::

    from common.client import Client

    client = Client.from_token_file("http://127.0.0.1:8750", "project.token")
    # or, with the control plane's replicas: "https://cp1:8750,https://cp2:8750"
    with client:  # leaving the block ends the sessions it opened
        session = client.open_session("4dstem", client_key=producer_public_key)
        job = client.launch_job(session.id, "local-mpiexec", {"scans": 1}, ranks=2)
        client.wait_registered(session.id, job.id, timeout_s=120)
        ...  # stream scan 0 (dataplane.producer.ProducerSession does it for this client)
        result = client.wait_result(session.id, 0, timeout_s=300, job=job.id)
    print(result.status, result.path, result.sha256)

docs/client.md has the whole worked example.

Every answer is a typed, validated, immutable object (``Session``, ``SessionDetail``,
``OpenedSession``, ``Job``, ``Scan``); fields the service adds later are ignored and states are read
as plain strings (the service's own models pin them), so an older client keeps working when a newer
service adds a field or a state. Every failure is a ``ClientError`` (``common.restclient`` documents
the tree: ``NotFound``, ``Forbidden``, ``Conflict``, ... carrying the status, title, detail, field
errors and request id of the service's problem+json answer); a wait that does not reach its end is a
``WaitError`` (``WaitTimeout`` when time ran out). Calls are bounded by ``timeout_s``; an answer of
no connection, 429 or 5xx is asked again up to ``attempts`` times with backoff, never sooner than a
``Retry-After`` says (and not at all when that is beyond ``MAX_RETRY_AFTER_S``); requests that
create something are retried only when the service cannot have acted on them (no answer, 429, 503).
A control plane running as several replicas is given as all their URLs (a list, or one string
``https://cp1:8750,https://cp2:8750``): a call that cannot connect to the replica in use goes to the
next at once, and the one that answers stays in use (``common.restclient.Replicas``).
The token goes only into the ``Authorization`` header: no message, ``repr`` or log shows it.

It needs nothing of the control plane's server, the gateway or the data plane: importing it loads
the standard library, pydantic and this package.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.answers import (
    ConsumerBody,
    GatewayInfo,
    JobBody,
    ScanBody,
    SessionBody,
    SessionCounters,
)
from common.credentials import PlainCredentials
from common.restclient import (
    MAX_RETRY_AFTER_S,
    REQUEST_TIMEOUT_S,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    MalformedAnswer,
    NotConnected,
    NotFound,
    RateLimited,
    Replicas,
    RestError,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    Unreachable,
    is_retryable,
    quote,
    with_retries,
)
from common.tokenfile import read_token, token_from

DEFAULT_URL: Final = "http://127.0.0.1:8750"
URL_ENV: Final = "DSN_CONTROLPLANE_URL"
TOKEN_ENV: Final = "DSN_PROJECT_TOKEN"
TOKEN_FILE_OPTION: Final = "--project-token-file"
DEFAULT_TEMPLATE: Final = "4dstem"
DEFAULT_POLL_S: Final = 0.5
# A job in one of these states may still change; every other state is final.
RUNNING_JOB_STATES: Final = frozenset({"pending", "running"})
Transport = Literal["curve", "plain"]
M = TypeVar("M", bound=BaseModel)


class InvalidArgument(ClientError, ValueError):
    """An argument the client refuses before asking anything: a URL that is not
    ``http(s)://HOST:PORT`` (or a list of them with an empty item or a URL twice), a token of
    another kind than a project token, or no project where the token names none."""


class WaitError(ClientError):
    """A wait that cannot reach its end: the job it depends on ended first, or the session is no
    longer open. ``last`` is the last thing seen (a Job, a SessionDetail, or None)."""

    def __init__(self, message: str, last: object = None) -> None:
        super().__init__(message)
        self.last = last


class WaitTimeout(WaitError):
    """The awaited state did not come within the timeout; waiting again may still see it."""


# --- answers -------------------------------------------------------------------------------------

class _Answer(BaseModel):
    # Frozen, and tolerant of fields a newer service adds.
    model_config = ConfigDict(frozen=True, extra="ignore")


class Session(_Answer, SessionBody):
    """A session as listed. ``state``: ``open``, ``ended`` or ``expired``; ``config`` is its DSN
    configuration with the consumers live at the time of asking; ``gateway`` where its producers
    stream."""

    @property
    def consumer_endpoints(self) -> list[str]:
        """The live consumers' endpoints, in the order the gateway deals frames to them."""
        return [endpoint for session in self.config.get("sessions", [])
                for endpoint in session.get("consumers", [])]


class OpenedSession(Session):
    """A session just opened, with its session token (audience: the gateway), returned this once.
    The token is in no ``repr`` and no ``model_dump``."""

    token: str = Field(repr=False, exclude=True)
    token_expires_at: datetime

    @property
    def plain_credentials(self) -> PlainCredentials:
        """The PLAIN credentials of a ``plain`` transport session."""
        return PlainCredentials.of(self.id, self.token)


class Consumer(_Answer, ConsumerBody):
    """One registered consumer rank; ``state``: ``live``, ``expired`` or ``left``."""


class Scan(_Answer, ScanBody):
    """A scan's recorded result: the HDF5 file (``path``) and its ``sha256``, the counters, and
    ``status``: ``complete`` (nothing missing), ``partial`` (sectors lost: ``loss_manifest`` lists
    them when the result comes from ``Client.scan``), ``failed`` (no file: ``reason`` says why) or
    ``spooled`` (``source`` ``gateway``: no consumer took the scan; ``path`` is the spool file to
    replay)."""

    loss_manifest: tuple[tuple[int, int, str], ...] = ()
    manifest_truncated: bool = False

    @property
    def complete(self) -> bool:
        return self.status == "complete"


class SessionDetail(Session):
    """A session with its consumers, recorded scans and counters."""

    consumers: list[Consumer]
    scans: list[Scan]
    counters: SessionCounters


class Job(_Answer, JobBody):
    """A consumer job; ``state`` as its launcher sees it: ``pending``, ``running``, ``succeeded``,
    ``failed``, ``cancelled``, or ``lost`` (the launcher no longer knows it)."""

    @property
    def finished(self) -> bool:
        return self.state not in RUNNING_JOB_STATES


class _Items(_Answer):
    items: list[dict[str, Any]]


# --- the client ----------------------------------------------------------------------------------

class Client:
    """The control plane at ``url`` (``http(s)://HOST:PORT``), called with a project ``token``.

    Where the control plane runs as several replicas, ``url`` names them all: a sequence of URLs
    or one comma-separated string. ``urls`` are they all, in order; ``url`` is the one in use,
    which changes when a replica cannot be connected to and the next one answers.

    ``project`` defaults to the one the token names. ``timeout_s`` bounds each HTTP call;
    ``attempts`` bounds the tries of one call; ``poll_s`` is how often a wait asks. ``sleep`` and
    ``clock`` are the waits' time sources.
    """

    def __init__(self, url: str | Sequence[str], token: str, *, project: str | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S, attempts: int = 4,
                 poll_s: float = DEFAULT_POLL_S, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, token_source: str = "") -> None:
        try:
            self.replicas = Replicas(url)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if timeout_s <= 0 or attempts < 1 or poll_s <= 0:
            raise InvalidArgument("timeout_s and poll_s must be positive and attempts at least 1")
        kind = token_claims(token).get("token_use")
        if kind not in (None, "project"):
            # The service refuses it too, but only as "not accepted here": say what is wrong.
            raise InvalidArgument(f"the token{f' from {token_source}' if token_source else ''} "
                                  f"is a{'n' if str(kind)[:1] in 'aeiou' else ''} {kind} token; "
                                  "the client takes a project token")
        self._token = token
        self._project = project
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.poll_s = poll_s
        self.token_source = token_source
        self._sleep = sleep
        self._clock = clock
        self._opened: list[str] = []  # sessions opened here and not yet ended, for close()

    @property
    def url(self) -> str:
        """The base URL of the replica in use."""
        return self.replicas.url

    @property
    def urls(self) -> tuple[str, ...]:
        """Every replica's base URL, in the order they are tried."""
        return self.replicas.urls

    @classmethod
    def from_token_file(cls, url: str | Sequence[str], path: Path | str, **options: Any) -> Client:
        """The token read from ``path`` (a regular file of yours, mode 0600)."""
        return cls(url, read_token(Path(path)), token_source=f"{path}", **options)

    @classmethod
    def from_environment(cls, url: str | Sequence[str] | None = None,
                         token_file: Path | None = None, **options: Any) -> Client:
        """``url``, else ``$DSN_CONTROLPLANE_URL`` (one URL or a comma-separated list), else
        ``DEFAULT_URL``; the token from
        ``token_file`` or ``$DSN_PROJECT_TOKEN``, one of them (both is an error, never a silent
        choice; ``common.tokenfile.TokenFileError``)."""
        found = token_from(token_file, env=TOKEN_ENV, option=TOKEN_FILE_OPTION)
        return cls(url or os.environ.get(URL_ENV) or DEFAULT_URL, found.token,
                   token_source=found.source, **options)

    def __repr__(self) -> str:
        return f"Client(url={self.url!r}, project={self._project or token_project(self._token)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """End every session this client opened and has not ended yet, newest first (leaving a
        ``with Client(...)`` block does this): the gateway stops admitting their producers and
        their jobs are cancelled at once rather than at expiry."""
        while self._opened:
            self.end_session(self._opened[-1])

    @property
    def project(self) -> str:
        """The project this client works in: the one given, else the one its token names."""
        project = self._project or token_project(self._token)
        if project is None:
            raise InvalidArgument("the token names no project; pass project=")
        return project

    # sessions

    def open_session(self, template: str = DEFAULT_TEMPLATE, params: dict[str, Any] | None = None,
                     *, client_key: bytes | str, ttl: int | None = None,
                     transport: Transport = "curve", project: str | None = None,
                     lanes: int = 1) -> OpenedSession:
        """Open a session of ``project`` (default: the client's) from DSN template ``template``;
        the gateway will admit the producer holding the secret of ``client_key`` (its Z85 CURVE
        public key), and with ``transport`` ``plain`` (where the policy allows it) the
        ``plain_credentials`` on its plaintext ingress too. ``ttl`` in seconds, default and
        maximum: the policy's. ``lanes`` above 1 splits each scan over that many gateways, one
        per lane (the session's ``lanes`` names them)."""
        key = client_key.decode("ascii") if isinstance(client_key, bytes) else client_key
        body: dict[str, Any] = {"project": project or self.project, "template": template,
                                "params": dict(params or {}), "client_key": key,
                                "transport": transport, "lanes": lanes}
        if ttl is not None:
            body["ttl"] = ttl
        answer = self._call("POST", _SESSIONS, body, creates=True)
        opened = _parse(OpenedSession, answer, "the opened session")
        self._opened.append(opened.id)
        return opened

    def sessions(self, project: str | None = None) -> list[Session]:
        """The project's sessions, oldest first (any state)."""
        return self._items(Session, _SESSIONS, {"project": project})

    def session(self, session: str) -> SessionDetail:
        """One session with its consumers, scans and counters."""
        return _parse(SessionDetail, self._call("GET", _session_path(session)), "the session")

    def end_session(self, session: str) -> SessionDetail:
        """End the session (idempotent): its tokens are revoked, its jobs cancelled, and the
        gateway stops admitting its producer."""
        ended = _parse(SessionDetail, self._call("DELETE", _session_path(session)), "the session")
        if session in self._opened:
            self._opened.remove(session)
        return ended

    def wait_registered(self, session: str, job: str, timeout_s: float) -> SessionDetail:
        """The session once all ``ranks`` of its consumer job ``job`` are live consumers (the
        session's scans are dealt among the consumers live when each begins: stream after this).
        WaitError at once if the job finishes first or the session is no longer open."""
        def probe() -> SessionDetail | None:
            detail, seen = self.session(session), self.job(session, job)
            live = sum(1 for c in detail.consumers if c.job_id == job and c.state == "live")
            if live >= seen.ranks:
                return detail
            if detail.state != "open":
                raise WaitError(f"session {session} is {detail.state}", detail)
            if seen.finished:
                raise WaitError(f"job {job} is {seen.state} ({seen.detail}) with {live} of "
                                f"{seen.ranks} ranks registered", seen)
            return None

        return self._wait(probe, timeout_s, f"the ranks of job {job} to register")

    # jobs

    def launch_job(self, session: str, template: str | None = None,
                   params: dict[str, Any] | None = None, *, ranks: int = 1) -> Job:
        """Render job template ``template`` (default: the launcher's own) with ``params`` and
        submit the session's consumer job of ``ranks`` MPI ranks."""
        body: dict[str, Any] = {"params": dict(params or {}), "ranks": ranks}
        if template is not None:
            body["template"] = template
        answer = self._call("POST", f"{_session_path(session)}/jobs", body, creates=True)
        return _parse(Job, answer, "the job")

    def jobs(self, session: str) -> list[Job]:
        """The session's jobs, oldest first."""
        return self._items(Job, f"{_session_path(session)}/jobs")

    def job(self, session: str, job: str) -> Job:
        return _parse(Job, self._call("GET", _job_path(session, job)), "the job")

    def cancel_job(self, session: str, job: str) -> Job:
        """Cancel the job (idempotent): its consumer token is revoked, its processes stopped."""
        return _parse(Job, self._call("DELETE", _job_path(session, job)), "the job")

    def wait_job(self, session: str, job: str, timeout_s: float) -> Job:
        """The job once it has finished (``succeeded``, ``failed``, ``cancelled`` or ``lost``:
        check ``state``); WaitTimeout if it is still pending or running after ``timeout_s``."""
        def probe() -> Job | None:
            seen = self.job(session, job)
            return seen if seen.finished else None

        return self._wait(probe, timeout_s, f"job {job} of session {session} to finish")

    # scans

    def scans(self, project: str | None = None, *, session: str | None = None,
              limit: int = 100) -> list[Scan]:
        """Recorded scan results, oldest first: the project's, or one session's."""
        query = {"project": project, "session": session, "limit": str(limit)}
        return self._items(Scan, "/api/v1/scans", query)

    def scan_results(self, session: str, scan: int) -> list[Scan]:
        """Every result of one scan (its consumer job's, and the gateway's if it spooled or
        interrupted the scan), with the loss manifests. NotFound before any is recorded."""
        return self._items(Scan, f"{_session_path(session)}/scans/{int(scan)}")

    def scan(self, session: str, scan: int) -> Scan:
        """The scan's result: its consumer job's if there is one, else the gateway's."""
        return _primary(self.scan_results(session, scan))

    def wait_result(self, session: str, scan: int, timeout_s: float, *,
                    job: str | None = None) -> Scan:
        """The scan's result (as ``scan``) once it is recorded; with ``job``, fail at once if
        that job finishes without recording it. Whatever its ``status``: check it."""
        def recorded() -> Scan | None:
            try:
                return self.scan(session, scan)
            except NotFound:
                return None

        def probe() -> Scan | None:
            if (found := recorded()) is not None:
                return found
            if job is None or not (seen := self.job(session, job)).finished:
                return None
            # The job reports before it exits: a result is recorded by now, or never will be.
            if (found := recorded()) is not None:
                return found
            raise WaitError(f"job {job} is {seen.state} ({seen.detail}) and recorded no result "
                            f"for scan {scan}", seen)

        return self._wait(probe, timeout_s, f"the result of scan {scan} of session {session}")

    # plumbing

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              query: dict[str, str | None] | None = None, creates: bool = False
              ) -> dict[str, Any]:
        given = {name: value for name, value in (query or {}).items() if value is not None}
        target = f"{path}?{urllib.parse.urlencode(given)}" if given else path
        return with_retries(
            lambda: self.replicas.call_json(self._token, method, target, body,
                                            timeout_s=self.timeout_s),
            attempts=self.attempts, sleep=self._sleep,
            retry_if=_not_acted_on if creates else is_retryable)

    def _items(self, model: type[M], path: str,
               query: dict[str, str | None] | None = None) -> list[M]:
        answer = _parse(_Items, self._call("GET", path, query=query), "the list")
        return [_parse(model, item, "a listed item") for item in answer.items]

    def _wait(self, probe: Callable[[], M | None], timeout_s: float, what: str) -> M:
        deadline = self._clock() + timeout_s
        while True:
            found = probe()
            if found is not None:
                return found
            left = deadline - self._clock()
            if left <= 0:
                raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}")
            self._sleep(min(self.poll_s, left))


_SESSIONS: Final = "/api/v1/sessions"


def _session_path(session: str) -> str:
    return f"{_SESSIONS}/{quote(session)}"


def _job_path(session: str, job: str) -> str:
    return f"{_session_path(session)}/jobs/{quote(job)}"


def _not_acted_on(exc: Exception) -> bool:
    # A second request that creates something after a first that did take effect would be
    # refused (409) or create it twice: ask again only when the first cannot have been acted on,
    # because it never reached a replica (no connection) or was refused before being acted on.
    # A timeout or a reset once it was sent is raised: the caller looks before asking again.
    return isinstance(exc, NotConnected) or (isinstance(exc, RestError)
                                             and exc.status in (429, 503))


def _primary(results: list[Scan]) -> Scan:
    return next((r for r in results if r.source == "consumer"), results[0])


def _parse(model: type[M], answer: object, what: str) -> M:
    try:
        return model.model_validate(answer)
    except ValidationError as exc:
        # The answer may hold a token: name the fields at fault, never the values.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False,
                                    include_context=False)[:5])
        raise MalformedAnswer(f"the control plane's answer ({what}) is malformed: {problems}",
                              None) from None


def token_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, read without verifying them (the service verifies; the client only names
    the project it works in and the kind of token it holds); empty for what is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def token_project(token: str) -> str | None:
    """The ``project`` claim of a JWT (unverified); None for a token that names none."""
    project = token_claims(token).get("project")
    return project if isinstance(project, str) and project else None


# The answers, the client, and the whole error tree in one import.
__all__ = [
    "DEFAULT_TEMPLATE", "DEFAULT_URL", "MAX_RETRY_AFTER_S", "TOKEN_ENV", "URL_ENV",
    "BadRequest", "Client", "ClientError", "Conflict", "Consumer", "Forbidden",
    "GatewayInfo", "InvalidArgument", "Job", "MalformedAnswer", "NotConnected", "NotFound",
    "OpenedSession",
    "RateLimited", "RestError", "Scan", "ServiceError", "ServiceUnavailable", "Session",
    "SessionCounters", "SessionDetail", "Transport", "Unauthorized", "Unreachable", "WaitError",
    "WaitTimeout", "token_claims", "token_project",
]
