"""Streaming sessions, their consumers, consumer jobs and scan results (SPEC §3, §4, §7).

A session's life: a project token opens it (template, parameters, the producer's CURVE public key);
the policy decides at the gate; the DSN template is rendered and validated; the session, its
rendered configuration (JSON) and its session token's metadata are stored in one transaction,
under the project's session quota; the caller gets the session token once, with the gateway's
endpoint and server key. HPC consumer ranks register their endpoints with a consumer token and
hold a lease that heartbeats renew; ``POST .../jobs`` renders a job template and submits it
through the configured launcher; rank 0 reports each scan's result. A session ends when deleted
(its session token and its jobs' consumer tokens are revoked in the same transaction) or when it
expires.

Session state and lease state are pure functions of the stored record and the clock
(``session_state``, ``lease_state``): nothing sweeps expired rows, and a moved clock expires them.

Authorization: every route's resource names the session's real project, looked up before the policy
decides, so a token of another project is refused with 403 (rule ``cross-project``) and audited. A
session id that does not exist is 404 before any decision (ids are 128 random bits: the answer
reveals nothing guessable). ``sessions:open`` is template-bound: opening a session, or submitting a
consumer job, names the DSN or job template the project must be allowed to use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import zmq
from aiohttp import web
from pydantic import Field, StringConstraints, model_validator

from controlplane import templates_api
from controlplane.errors import (
    BadRequest,
    ConfigurationError,
    Conflict,
    ControlPlaneError,
    NotFound,
)
from controlplane.launchers import (
    TOKEN_NAME,
    JobHandle,
    JobSpec,
    JobStatus,
    Launcher,
    dsn_command,
    mpiexec_command,
)
from controlplane.middlewares import CLAIMS, SERVICES, ResourceOf, RouteSpec, Services
from controlplane.policy import PolicySet, Resource
from controlplane.schemas import Name, QueryParams, RequestBody, ResponseBody, Ttl, utc
from controlplane.store import Conn, Store, TokenRecord, ensure_private_dir
from controlplane.templating import (
    NAME_PATTERN as TEMPLATE_NAME_PATTERN,
)
from controlplane.templating import Kind, Template, parse_template, render_values
from controlplane.tokens import Claims, TokenKind
from controlplane.views import ADMIN_OR_PROJECT, PROJECT_ONLY, parse_body, parse_query, reply
from dataplane import strictyaml
from dataplane.config import (
    ConfigError,
    ConnectEndpoint,
    CurveKey,
    Session,
    parse_config,
    parse_endpoint,
)
from dataplane.keys import KeyFileError, load_keypair

log = logging.getLogger(__name__)

R = TypeVar("R")
CONSUMER_ONLY = frozenset({TokenKind.CONSUMER})
SESSION_QUOTA = "sessions"  # open sessions a project may hold at once
CONSUMER_QUOTA = "consumers"  # live consumer ranks per session (and ranks per job)
CONFIG_NAME = "dsn.yaml"
OUTPUT_NAME = "output"
# The job template a launcher runs unless the request names another.
DEFAULT_JOB_TEMPLATES: Mapping[str, str] = {"local": "local-mpiexec", "slurm": "slurm-sbatch"}
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_SCAN = 2**63 - 1  # SQLite INTEGER range

SessionState = Literal["open", "ended", "expired"]
LeaseState = Literal["live", "expired", "left"]
# A job the launcher no longer knows (a local job after a control-plane restart) is "lost".
JobState = Literal["pending", "running", "succeeded", "failed", "cancelled", "lost"]
ScanStatus = Literal["complete", "partial", "failed"]

TemplateName = Annotated[str, StringConstraints(pattern=TEMPLATE_NAME_PATTERN)]
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
SessionIdText = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
Count = Annotated[int, Field(ge=0, le=MAX_SCAN)]
Host = Annotated[str, StringConstraints(min_length=1, max_length=253,
                                        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:_-]*[A-Za-z0-9])?$")]
ResultPath = Annotated[str, StringConstraints(min_length=2, max_length=4096,
                                              pattern=r"^/[^\x00-\x1f\x7f]*$")]


# --- request and response bodies -----------------------------------------------------------------

class SessionOpen(RequestBody):
    """Open a session of ``project`` (the token's own) from DSN template ``template``.

    ``client_key`` is the producer's Z85 CURVE public key: the gateway admits exactly this key.
    ``ttl`` (seconds) defaults to, and is capped by, the policy's session-token lifetime and the
    project token's remaining life; the session expires with its token.
    """

    project: Name
    template: TemplateName
    params: dict[str, Any] = Field(default_factory=dict)
    client_key: CurveKey
    ttl: Ttl | None = None


class ConsumerRegister(RequestBody):
    """One MPI rank's endpoint (``tcp://IP:PORT`` inside the session's allowed targets)."""

    endpoint: ConnectEndpoint
    rank: Annotated[int, Field(ge=0, le=4095)]
    job_id: JobId
    host: Host


class JobSubmit(RequestBody):
    """A consumer job: ``template`` defaults to the launcher's own job template."""

    template: TemplateName | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    ranks: Annotated[int, Field(ge=1, le=4096)] = 1


class ScanReport(RequestBody):
    """Rank 0's result for one scan: the HDF5 file, its SHA-256 and the completeness counters."""

    path: ResultPath
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    frames: Count
    events: Count
    expected_sectors: Count
    received_sectors: Count
    duplicate_sectors: Count
    lost_sectors: Count
    incomplete_frames: Count
    status: ScanStatus

    @model_validator(mode="after")
    def _complete_means_nothing_missing(self) -> ScanReport:
        if self.status == "complete" and (self.lost_sectors or self.incomplete_frames):
            raise ValueError("a scan with lost sectors or incomplete frames is not complete")
        return self


class SessionQuery(QueryParams):
    project: Name | None = None


class ScanQuery(QueryParams):
    project: Name | None = None
    session: SessionIdText | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class GatewayInfo(ResponseBody):
    endpoint: str
    server_key: str


class ConsumerOut(ResponseBody):
    id: str
    session: str
    job_id: str
    rank: int
    endpoint: str
    host: str
    state: LeaseState
    registered_at: datetime
    lease_expires_at: datetime
    left_at: datetime | None


class JobOut(ResponseBody):
    id: str
    session: str
    template: str
    template_version: int
    launcher: str
    ranks: int
    state: JobState
    exit_code: int | None
    detail: str
    submitted_at: datetime


class ScanOut(ResponseBody):
    session: str
    scan: int
    project: str
    path: str
    sha256: str
    frames: int
    events: int
    expected_sectors: int
    received_sectors: int
    duplicate_sectors: int
    lost_sectors: int
    incomplete_frames: int
    status: ScanStatus
    reported_at: datetime


class ScanList(ResponseBody):
    items: list[ScanOut]


class SessionCounters(ResponseBody):
    live_consumers: int
    consumers: int
    jobs: int
    scans: int
    complete_scans: int
    frames: int
    events: int


class SessionOut(ResponseBody):
    """A session; ``config`` is its DSN configuration with the currently live consumers."""

    id: str
    project: str
    template: str
    template_version: int
    params: dict[str, Any]
    client_key: str
    state: SessionState
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    config: dict[str, Any]
    gateway: GatewayInfo


class SessionList(ResponseBody):
    items: list[SessionOut]


class SessionDetail(SessionOut):
    consumers: list[ConsumerOut]
    scans: list[ScanOut]
    counters: SessionCounters


class SessionOpened(SessionOut):
    """The opened session and its session token (audience: the gateway), shown this once."""

    token: str
    token_type: Literal["Bearer"] = "Bearer"
    token_expires_at: datetime


# --- stored records and the pure core ------------------------------------------------------------

def session_state(ended_at: float | None, expires_at: float, now: float) -> SessionState:
    if ended_at is not None:
        return "ended"
    return "open" if now < expires_at else "expired"


def lease_state(left_at: float | None, lease_expires_at: float, now: float) -> LeaseState:
    if left_at is not None:
        return "left"
    return "live" if now < lease_expires_at else "expired"


def lease_until(now: float, lease_s: int, session_expires_at: float) -> float:
    """A lease never outlives its session: the gateway must forget both at the same moment."""
    return min(now + lease_s, session_expires_at)


def lifetime(requested: int | None, cap: int, *deadlines: float, now: float) -> int:
    """Seconds a new session or token may live: the request, the policy cap and every deadline
    (the parent token's expiry, the session's), whichever is first."""
    remaining = min(int(deadline - now) for deadline in deadlines)
    if remaining < 1:
        raise Conflict("the session or token expires within a second; nothing can be issued")
    return min(requested or cap, cap, remaining)


@dataclass(frozen=True)
class SessionRecord:
    id: str
    project: str
    template: str
    template_version: int
    params: dict[str, Any]
    client_key: str
    config: dict[str, Any]
    token_jti: str
    created_at: float
    expires_at: float
    ended_at: float | None

    def state(self, now: float) -> SessionState:
        return session_state(self.ended_at, self.expires_at, now)


@dataclass(frozen=True)
class ConsumerRecord:
    id: str
    session_id: str
    job_id: str
    rank: int
    endpoint: str
    host: str
    registered_at: float
    lease_expires_at: float
    left_at: float | None

    def state(self, now: float) -> LeaseState:
        return lease_state(self.left_at, self.lease_expires_at, now)


@dataclass(frozen=True)
class JobRecord:
    id: str
    session_id: str
    template: str
    template_version: int
    launcher: str
    native_id: str
    workdir: str
    ranks: int
    token_jti: str
    submitted_at: float

    def handle(self) -> JobHandle:
        return JobHandle(self.launcher, self.id, self.native_id, Path(self.workdir))


@dataclass(frozen=True)
class ScanRecord:
    session_id: str
    scan: int
    project: str
    path: str
    sha256: str
    frames: int
    events: int
    expected_sectors: int
    received_sectors: int
    duplicate_sectors: int
    lost_sectors: int
    incomplete_frames: int
    status: str
    reported_at: float

    def same_result(self, other: ScanRecord) -> bool:
        """Whether ``other`` reports the same outcome (the time of the report aside)."""
        return replace(self, reported_at=0.0) == replace(other, reported_at=0.0)


def admission_problem(live: Sequence[ConsumerRecord], new: ConsumerRecord,
                      limit: int) -> str | None:
    """Why ``new`` may not join the session's ``live`` consumers, or None."""
    if any(c.job_id == new.job_id and c.rank == new.rank for c in live):
        return f"rank {new.rank} of job {new.job_id} is already registered"
    if any(c.endpoint == new.endpoint for c in live):
        return f"endpoint {new.endpoint} is already registered"
    if len(live) >= limit:
        return f"the session already has its quota of {limit} live consumers"
    return None


def endpoint_problem(endpoint: str, allowed_targets: Sequence[str],
                     policy: PolicySet) -> str | None:
    """Why the gateway may not connect to ``endpoint``, or None: it must lie in the session's
    allowed targets and in the policy's targets."""
    host, port = parse_endpoint(endpoint)
    if not any(_within(host, target) for target in allowed_targets):
        return f"{host} is outside the session's allowed targets {list(allowed_targets)}"
    if not policy.target_allowed(host):
        return f"{host} is outside the targets the policy allows"
    bracketed = f"[{host}]" if ":" in host else host
    if endpoint != f"tcp://{bracketed}:{port}":
        return f"write the endpoint in canonical form: tcp://{bracketed}:{port}"
    return None


def _within(host: str, target: str) -> bool:
    address = ipaddress.ip_address(host)
    network = ipaddress.ip_network(target)
    return address.version == network.version and address in network


def config_with_consumers(config: dict[str, Any], endpoints: Sequence[str]) -> dict[str, Any]:
    """The session's stored configuration naming ``endpoints`` as its consumers."""
    sessions = [{**session, "consumers": list(endpoints)} for session in config["sessions"]]
    return {**config, "sessions": sessions}


# --- the repository (SQL over Store.read / Store.write) ------------------------------------------

_JSON_COLUMNS = frozenset({"params", "config"})


def _record(cls: type[R], row: sqlite3.Row) -> R:
    values = {f.name: row[f.name] for f in fields(cls)}  # type: ignore[arg-type]
    for name in _JSON_COLUMNS & values.keys():
        values[name] = json.loads(values[name])
    return cls(**values)


async def _insert(conn: Conn, table: str, record: Any) -> None:
    # Table and column names come from this module's dataclasses, never from a request.
    values = {f.name: getattr(record, f.name) for f in fields(record)}
    for name in _JSON_COLUMNS & values.keys():
        values[name] = json.dumps(values[name], sort_keys=True)
    await conn.execute(f"INSERT INTO {table} ({', '.join(values)}) "
                       f"VALUES ({', '.join('?' * len(values))})", tuple(values.values()))


async def _one(conn: Conn, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
    async with conn.execute(sql, params) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
    return row


async def _all(conn: Conn, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
    async with conn.execute(sql, params) as cursor:
        return list(await cursor.fetchall())


async def insert_session(store: Store, session: SessionRecord, token: TokenRecord, limit: int,
                         now: float) -> None:
    """Store the session and its token's metadata, in one transaction with the quota and client
    key checks so that concurrent opens cannot both pass them."""
    async def body(conn: Conn) -> None:
        open_sessions = await _one(conn, "SELECT COUNT(*) FROM sessions WHERE project = ? AND "
                                         "ended_at IS NULL AND expires_at > ?",
                                   (session.project, now))
        if open_sessions is not None and open_sessions[0] >= limit:
            raise Conflict(f"project {session.project!r} has reached its quota of {limit} open "
                           "sessions; end one first")
        # The gateway admits a producer by its key alone: one key, one open session.
        if await _one(conn, "SELECT 1 FROM sessions WHERE client_key = ? AND ended_at IS NULL "
                            "AND expires_at > ?", (session.client_key, now)):
            raise Conflict("this client key already belongs to an open session")
        await conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", astuple(token))
        await _insert(conn, "sessions", session)
    await store.write(body)


async def get_session(store: Store, session_id: str) -> SessionRecord | None:
    rows = await store.read("SELECT * FROM sessions WHERE id = ?", (session_id,))
    return _record(SessionRecord, rows[0]) if rows else None


async def list_sessions(store: Store, project: str | None) -> list[SessionRecord]:
    rows = await store.read("SELECT * FROM sessions WHERE ?1 IS NULL OR project = ?1 "
                            "ORDER BY created_at, id", (project,))
    return [_record(SessionRecord, row) for row in rows]


async def end_session(store: Store, session_id: str, now: float) -> SessionRecord:
    """Mark the session ended (idempotent: the first time stays) and revoke its session token and
    its jobs' consumer tokens in the same transaction, so it stops everywhere at once."""
    async def body(conn: Conn) -> SessionRecord:
        cursor = await conn.execute("UPDATE sessions SET ended_at = COALESCE(ended_at, ?) "
                                    "WHERE id = ? RETURNING *", (now, session_id))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} does not exist")
        await conn.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE jti = ? "
                           "OR jti IN (SELECT token_jti FROM jobs WHERE session_id = ?)",
                           (now, row["token_jti"], session_id))
        return _record(SessionRecord, row)
    return await store.write(body)


async def _open_session_in(conn: Conn, session_id: str, now: float) -> SessionRecord:
    row = await _one(conn, "SELECT * FROM sessions WHERE id = ?", (session_id,))
    if row is None:
        raise NotFound(f"session {session_id!r} does not exist")
    session = _record(SessionRecord, row)
    if session.state(now) != "open":
        raise Conflict(f"session {session_id} has {session.state(now)}")
    return session


async def _live_consumers_in(conn: Conn, session_id: str, now: float) -> list[ConsumerRecord]:
    rows = await _all(conn, "SELECT * FROM consumers WHERE session_id = ? AND left_at IS NULL "
                            "AND lease_expires_at > ? ORDER BY rank, job_id", (session_id, now))
    return [_record(ConsumerRecord, row) for row in rows]


async def register_consumer(store: Store, consumer: ConsumerRecord, limit: int,
                            now: float) -> None:
    async def body(conn: Conn) -> None:
        await _open_session_in(conn, consumer.session_id, now)
        live = await _live_consumers_in(conn, consumer.session_id, now)
        problem = admission_problem(live, consumer, limit)
        if problem is not None:
            raise Conflict(problem)
        await _insert(conn, "consumers", consumer)
    await store.write(body)


async def renew_lease(store: Store, session_id: str, consumer_id: str, lease_s: int,
                      now: float) -> ConsumerRecord:
    """Extend a live lease; a lease that expired or was left cannot be revived: register again."""
    async def body(conn: Conn) -> ConsumerRecord:
        session = await _open_session_in(conn, session_id, now)
        consumer = await _consumer_in(conn, session_id, consumer_id)
        if consumer.state(now) != "live":
            raise Conflict(f"consumer {consumer_id} has {consumer.state(now)}; register again")
        await conn.execute("UPDATE consumers SET lease_expires_at = ? WHERE id = ?",
                           (lease_until(now, lease_s, session.expires_at), consumer_id))
        return await _consumer_in(conn, session_id, consumer_id)
    return await store.write(body)


async def _consumer_in(conn: Conn, session_id: str, consumer_id: str) -> ConsumerRecord:
    row = await _one(conn, "SELECT * FROM consumers WHERE id = ? AND session_id = ?",
                     (consumer_id, session_id))
    if row is None:
        raise NotFound(f"session {session_id} has no consumer {consumer_id!r}")
    return _record(ConsumerRecord, row)


async def leave(store: Store, session_id: str, consumer_id: str, now: float) -> ConsumerRecord:
    """Mark the consumer gone (idempotent: the first time stays)."""
    async def body(conn: Conn) -> ConsumerRecord:
        cursor = await conn.execute("UPDATE consumers SET left_at = COALESCE(left_at, ?) "
                                    "WHERE id = ? AND session_id = ? RETURNING *",
                                    (now, consumer_id, session_id))
        row = await cursor.fetchone()
        if row is None:
            raise NotFound(f"session {session_id} has no consumer {consumer_id!r}")
        return _record(ConsumerRecord, row)
    return await store.write(body)


async def list_consumers(store: Store, session_id: str) -> list[ConsumerRecord]:
    rows = await store.read("SELECT * FROM consumers WHERE session_id = ? "
                            "ORDER BY registered_at, id", (session_id,))
    return [_record(ConsumerRecord, row) for row in rows]


async def insert_job(store: Store, job: JobRecord) -> None:
    async def body(conn: Conn) -> None:
        await _insert(conn, "jobs", job)
    await store.write(body)


async def get_job(store: Store, session_id: str, job_id: str) -> JobRecord | None:
    rows = await store.read("SELECT * FROM jobs WHERE id = ? AND session_id = ?",
                            (job_id, session_id))
    return _record(JobRecord, rows[0]) if rows else None


async def count_jobs(store: Store, session_id: str) -> int:
    rows = await store.read("SELECT COUNT(*) FROM jobs WHERE session_id = ?", (session_id,))
    return int(rows[0][0])


async def record_result(store: Store, result: ScanRecord) -> ScanRecord:
    """Store a scan's result once; the same report again returns the stored one, a different
    report for the same scan is a conflict (a result is a fact, never overwritten)."""
    async def body(conn: Conn) -> ScanRecord:
        row = await _one(conn, "SELECT * FROM scan_results WHERE session_id = ? AND scan = ?",
                         (result.session_id, result.scan))
        if row is None:
            await _insert(conn, "scan_results", result)
            return result
        stored = _record(ScanRecord, row)
        if not stored.same_result(result):
            raise Conflict(f"scan {result.scan} of session {result.session_id} already has a "
                           "different result")
        return stored
    return await store.write(body)


async def list_results(store: Store, *, project: str | None, session_id: str | None,
                       limit: int) -> list[ScanRecord]:
    rows = await store.read(
        "SELECT * FROM scan_results WHERE (?1 IS NULL OR project = ?1) "
        "AND (?2 IS NULL OR session_id = ?2) ORDER BY reported_at, session_id, scan LIMIT ?3",
        (project, session_id, limit))
    return [_record(ScanRecord, row) for row in rows]


async def live_sessions(store: Store, now: float, session_id: str | None = None
                        ) -> list[Session]:
    """What the gateways must serve now: every open session (or just ``session_id``) whose
    session token is not revoked, with its live consumers in rank order."""
    rows = await store.read(
        "SELECT s.* FROM sessions s JOIN tokens t ON t.jti = s.token_jti WHERE s.ended_at IS NULL "
        "AND s.expires_at > ?1 AND t.revoked_at IS NULL AND (?2 IS NULL OR s.id = ?2) "
        "ORDER BY s.created_at, s.id", (now, session_id))
    consumers = await store.read(
        "SELECT * FROM consumers WHERE left_at IS NULL AND lease_expires_at > ?1 "
        "AND (?2 IS NULL OR session_id = ?2) ORDER BY rank, job_id", (now, session_id))
    endpoints: dict[str, list[str]] = {}
    for row in consumers:
        endpoints.setdefault(row["session_id"], []).append(row["endpoint"])
    sessions = (_gateway_session(_record(SessionRecord, row), endpoints.get(row["id"], []))
                for row in rows)
    return [session for session in sessions if session is not None]


def _gateway_session(record: SessionRecord, endpoints: Sequence[str]) -> Session | None:
    try:
        return parse_config(config_with_consumers(record.config, endpoints)).session(record.id)
    except ConfigError as exc:
        # Validated when rendered; a stored config that no longer validates is not served.
        log.error("session %s cannot be published: %s", record.id, exc)
        return None


async def publish_session(services: Services, session_id: str) -> None:
    """Hand a committed change of ``session_id`` to the gateways now. A failure is logged: the
    state service's reconcile loop publishes the difference within ``reconcile_s``."""
    try:
        live = await live_sessions(services.store, services.now(), session_id)
        await services.state.publish(session_id, live[0] if live else None)
    except (ControlPlaneError, zmq.ZMQError) as exc:
        log.warning("publishing session %s failed (reconcile retries): %s", session_id, exc)


# --- templates, keys and files -------------------------------------------------------------------

async def current_template(store: Store, name: str, kind: Kind) -> tuple[Template, int]:
    """The current stored version of template ``name`` (``templates_api``) and its number; every
    render of a session or job goes through here."""
    try:
        found = await templates_api.current(store, name)
    except NotFound:
        raise BadRequest(f"no template named {name!r}",
                         errors=[{"field": "template", "message": "no such template"}]) from None
    if found.kind != kind:
        raise BadRequest(f"template {name!r} is a {found.kind} template, not a {kind} template",
                         errors=[{"field": "template", "message": f"not a {kind} template"}])
    # Checked when saved; parsing is CPU-bound, so it runs off the event loop.
    return await asyncio.to_thread(parse_template, found.source), found.version


async def gateway_info(services: Services) -> GatewayInfo:
    path = services.settings.gateway_public_key_file
    try:
        pair = await asyncio.to_thread(load_keypair, path)
    except KeyFileError as exc:
        raise ConfigurationError(f"the gateway's server key is unavailable: {exc}") from None
    return GatewayInfo(endpoint=services.settings.gateway_endpoint,
                       server_key=pair.public.decode())


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 from the first instant; never follow a link or reuse a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _prepare_job_dir(jobs_dir: Path, job_id: str, config: dict[str, Any]) -> Path:
    """A fresh 0700 job directory holding the session's configuration (0600) and an output dir."""
    ensure_private_dir(jobs_dir)
    workdir = jobs_dir / job_id
    workdir.mkdir(mode=0o700)
    (workdir / OUTPUT_NAME).mkdir(mode=0o700)
    _write_private(workdir / CONFIG_NAME, strictyaml.dump(config).encode())
    return workdir


# --- operations ----------------------------------------------------------------------------------

def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


async def _session_limit(services: Services, project: str) -> int:
    record = await services.store.get_project(project)
    if record is None:
        raise NotFound(f"project {project!r} does not exist")
    return record.quotas.get(SESSION_QUOTA, services.policies.current.quota(project, SESSION_QUOTA))


def _token_record(claims: Claims, parent_jti: str) -> TokenRecord:
    return TokenRecord(jti=claims.jti, project=claims.project, kind=claims.kind.value,
                       subject=claims.sub, scope=" ".join(sorted(claims.scope)),
                       issued_at=float(claims.iat), expires_at=float(claims.exp),
                       parent_jti=parent_jti)


def _session_token(services: Services, parent: Claims, ttl: int) -> tuple[str, Claims]:
    scope = parent.scope & services.policies.current.scopes_for(TokenKind.SESSION)
    if not scope:
        raise BadRequest("the project token carries no scope a session token may hold")
    return services.tokens.issue(kind=TokenKind.SESSION, subject=parent.sub,
                                 project=parent.project, scope=scope, ttl_s=ttl,
                                 audience=services.settings.gateway_audience)


async def _render_session(services: Services, body: SessionOpen, session_id: str,
                          expires_at: float) -> tuple[dict[str, Any], int]:
    template, version = await current_template(services.store, body.template, "dsn")
    settings = services.settings
    system = {"session_id": session_id, "client_key": body.client_key,
              "expires_at": utc(expires_at), "ingress": settings.gateway_endpoint,
              "server_secret_key_file": str(settings.gateway_secret_key_file), "consumers": []}
    # Rendering is bounded (1 s) but CPU-bound: keep it off the event loop.
    rendered = await asyncio.to_thread(render_values, template, body.params, system,
                                       services.policies.current)
    assert rendered.config is not None  # a dsn template always renders a validated config
    return rendered.config.model_dump(mode="json"), version


async def open_session(services: Services, parent: Claims, body: SessionOpen
                       ) -> tuple[SessionRecord, str]:
    now = services.now()
    cap = services.policies.current.lifetime_cap(TokenKind.SESSION)
    token, claims = _session_token(services, parent, lifetime(body.ttl, cap, parent.exp, now=now))
    session_id = _new_id("s")
    config, version = await _render_session(services, body, session_id, claims.exp)
    session = SessionRecord(id=session_id, project=body.project, template=body.template,
                            template_version=version, params=dict(body.params),
                            client_key=body.client_key, config=config, token_jti=claims.jti,
                            created_at=now, expires_at=float(claims.exp), ended_at=None)
    limit = await _session_limit(services, body.project)
    await insert_session(services.store, session, _token_record(claims, parent.jti), limit, now)
    services.metrics.tokens_issued.labels(claims.kind.value).inc()
    return session, token


async def existing_session(services: Services, session_id: str) -> SessionRecord:
    session = await get_session(services.store, session_id)
    if session is None:
        raise NotFound(f"session {session_id!r} does not exist")
    return session


async def add_consumer(services: Services, session: SessionRecord,
                       body: ConsumerRegister) -> ConsumerRecord:
    now = services.now()
    policy = services.policies.current
    targets = session.config["sessions"][0]["allowed_targets"]
    problem = endpoint_problem(body.endpoint, targets, policy)
    if problem is not None:
        raise BadRequest(f"endpoint refused: {problem}",
                         errors=[{"field": "endpoint", "message": problem}])
    consumer = ConsumerRecord(
        id=_new_id("c"), session_id=session.id, job_id=body.job_id, rank=body.rank,
        endpoint=body.endpoint, host=body.host, registered_at=now,
        lease_expires_at=lease_until(now, services.settings.lease_s, session.expires_at),
        left_at=None)
    limit = policy.quota(session.project, CONSUMER_QUOTA)
    await register_consumer(services.store, consumer, limit, now)
    return consumer


def job_template_name(services: Services, body: JobSubmit) -> str:
    if body.template is not None:
        return body.template
    launcher = services.settings.launcher
    if launcher not in DEFAULT_JOB_TEMPLATES:
        raise ConfigurationError(f"launcher {launcher!r} has no default job template; name one")
    return DEFAULT_JOB_TEMPLATES[launcher]


def _launcher(services: Services, name: str) -> Launcher:
    launcher = services.launchers.get(name)
    if launcher is None:
        raise ConfigurationError(f"launcher {name!r} is not configured in this control plane")
    return launcher


def _consumer_token(services: Services, parent: Claims, session: SessionRecord,
                    job_id: str) -> tuple[str, Claims]:
    now = services.now()
    cap = services.policies.current.lifetime_cap(TokenKind.CONSUMER)
    ttl = lifetime(None, cap, parent.exp, session.expires_at, now=now)
    return services.tokens.issue(
        kind=TokenKind.CONSUMER, subject=f"job:{job_id}", project=session.project,
        scope=services.policies.current.scopes_for(TokenKind.CONSUMER), ttl_s=ttl,
        audience=services.settings.api_audience)


async def _job_system(services: Services, session: SessionRecord, workdir: Path,
                      ranks: int) -> dict[str, Any]:
    settings = services.settings
    system: dict[str, Any] = {
        # The job directory is named after the job, so its ranks register under the job's id.
        "session_id": session.id, "job_id": workdir.name, "ranks": ranks,
        "config_path": str(workdir / CONFIG_NAME),
        "output_dir": str(workdir / OUTPUT_NAME), "token_file": str(workdir / TOKEN_NAME),
        "controlplane_url": settings.base_url, "dsn_command": dsn_command()}
    if settings.launcher == "local":
        # mpiexec_command ends in "-n RANKS"; the template writes those itself.
        system["mpiexec"] = (await asyncio.to_thread(mpiexec_command, ranks, []))[:-2]
    return system


async def _render_job(services: Services, session: SessionRecord, body: JobSubmit,
                      workdir: Path) -> tuple[str, int]:
    name = job_template_name(services, body)
    template, version = await current_template(services.store, name, "job")
    system = await _job_system(services, session, workdir, body.ranks)
    rendered = await asyncio.to_thread(render_values, template, body.params, system,
                                       services.policies.current)
    return rendered.text, version


def _check_ranks(services: Services, session: SessionRecord, ranks: int) -> None:
    limit = services.policies.current.quota(session.project, CONSUMER_QUOTA)
    if ranks > limit:
        raise BadRequest(f"{ranks} ranks exceed the quota of {limit} consumers per session",
                         errors=[{"field": "ranks", "message": f"at most {limit}"}])


async def _job_config(services: Services, session: SessionRecord) -> dict[str, Any]:
    now = services.now()
    live = [c.endpoint for c in await list_consumers(services.store, session.id)
            if c.state(now) == "live"]
    return config_with_consumers(session.config, live)


async def submit_job(services: Services, parent: Claims, session: SessionRecord,
                     body: JobSubmit) -> tuple[JobRecord, JobStatus]:
    if session.state(services.now()) != "open":
        raise Conflict(f"session {session.id} has {session.state(services.now())}")
    _check_ranks(services, session, body.ranks)
    launcher = _launcher(services, services.settings.launcher)
    job_id = _new_id("j")
    token, claims = _consumer_token(services, parent, session, job_id)
    spec, version = await _prepare_job(services, session, body, job_id, token)
    await services.store.add_token(_token_record(claims, parent.jti))
    services.metrics.tokens_issued.labels(claims.kind.value).inc()
    handle = await _submit(services, launcher, spec, claims.jti)
    job = JobRecord(id=job_id, session_id=session.id, template=job_template_name(services, body),
                    template_version=version, launcher=launcher.name,
                    native_id=handle.native_id, workdir=str(spec.workdir), ranks=body.ranks,
                    token_jti=claims.jti, submitted_at=services.now())
    await _remember_job(services.store, launcher, job)
    log.info("job %s of session %s submitted through %s", job_id, session.id, launcher.name)
    return job, await launcher.status(handle)


async def _prepare_job(services: Services, session: SessionRecord, body: JobSubmit, job_id: str,
                       token: str) -> tuple[JobSpec, int]:
    """Render the script (parameters are checked first), then lay out the job directory."""
    workdir = services.settings.jobs_dir / job_id
    script, version = await _render_job(services, session, body, workdir)
    await asyncio.to_thread(_prepare_job_dir, services.settings.jobs_dir, job_id,
                            await _job_config(services, session))
    return JobSpec(job_id=job_id, session_id=session.id, script=script, workdir=workdir,
                   token=token), version


async def _submit(services: Services, launcher: Launcher, spec: JobSpec, jti: str) -> JobHandle:
    try:
        return await launcher.submit(spec)
    except ControlPlaneError:
        # The job never started: its token must not outlive the attempt.
        await services.store.revoke_token(jti, services.now())
        raise


async def _remember_job(store: Store, launcher: Launcher, job: JobRecord) -> None:
    try:
        await insert_job(store, job)
    except ControlPlaneError:
        # A job nobody can poll or stop through the API must not keep running.
        await launcher.cancel(job.handle())
        raise


async def job_status(services: Services, job: JobRecord) -> JobStatus | None:
    """The launcher's view of the job; None when the launcher no longer knows it."""
    try:
        return await _launcher(services, job.launcher).status(job.handle())
    except NotFound:
        return None


async def cancel_jobs(services: Services, session_id: str) -> None:
    """Stop the jobs of an ended session; their tokens are already revoked, so a job that cannot
    be stopped can no longer act, and a failure is logged rather than undoing the end."""
    rows = await services.store.read("SELECT * FROM jobs WHERE session_id = ?", (session_id,))
    for job in (_record(JobRecord, row) for row in rows):
        launcher = services.launchers.get(job.launcher)
        try:
            if launcher is not None:
                await launcher.cancel(job.handle())
        except ControlPlaneError as exc:
            log.warning("could not cancel job %s of ended session %s: %s", job.id, session_id,
                        exc.detail)


def scan_record(session: SessionRecord, scan: int, body: ScanReport, now: float) -> ScanRecord:
    return ScanRecord(session_id=session.id, scan=scan, project=session.project,
                      reported_at=now, **body.model_dump())


def scan_number(request: web.Request) -> int:
    text = request.match_info["scan"]
    if not text.isascii() or not text.isdigit() or int(text) > MAX_SCAN:
        raise BadRequest("the scan number must be a non-negative integer",
                         errors=[{"field": "scan", "message": "not a scan number"}])
    return int(text)


# --- serialising ---------------------------------------------------------------------------------

def _time(ts: float | None) -> datetime | None:
    return None if ts is None else utc(ts)


def consumer_out(c: ConsumerRecord, now: float) -> ConsumerOut:
    return ConsumerOut(id=c.id, session=c.session_id, job_id=c.job_id, rank=c.rank,
                       endpoint=c.endpoint, host=c.host, state=c.state(now),
                       registered_at=utc(c.registered_at),
                       lease_expires_at=utc(c.lease_expires_at), left_at=_time(c.left_at))


def job_out(job: JobRecord, status: JobStatus | None) -> JobOut:
    lost = "the launcher no longer knows this job (the control plane restarted)"
    return JobOut(id=job.id, session=job.session_id, template=job.template,
                  template_version=job.template_version, launcher=job.launcher, ranks=job.ranks,
                  state="lost" if status is None else status.state,
                  exit_code=None if status is None else status.exit_code,
                  detail=lost if status is None else status.detail,
                  submitted_at=utc(job.submitted_at))


def scan_out(r: ScanRecord) -> ScanOut:
    values = {f.name: getattr(r, f.name) for f in fields(r)}
    return ScanOut.model_validate({**values, "session": r.session_id,
                                   "reported_at": utc(r.reported_at)})


def session_fields(s: SessionRecord, now: float, gateway: GatewayInfo,
                   live: Sequence[str] = ()) -> dict[str, Any]:
    return {"id": s.id, "project": s.project, "template": s.template,
            "template_version": s.template_version, "params": s.params,
            "client_key": s.client_key, "state": s.state(now), "created_at": utc(s.created_at),
            "expires_at": utc(s.expires_at), "ended_at": _time(s.ended_at),
            "config": config_with_consumers(s.config, live), "gateway": gateway}


def counters(consumers: Sequence[ConsumerRecord], jobs: int, scans: Sequence[ScanRecord],
             now: float) -> SessionCounters:
    return SessionCounters(
        live_consumers=sum(c.state(now) == "live" for c in consumers), consumers=len(consumers),
        jobs=jobs, scans=len(scans), complete_scans=sum(r.status == "complete" for r in scans),
        frames=sum(r.frames for r in scans), events=sum(r.events for r in scans))


async def summaries(services: Services, sessions: Sequence[SessionRecord]) -> list[SessionOut]:
    if not sessions:  # an empty list needs no gateway key
        return []
    gateway, now = await gateway_info(services), services.now()
    return [SessionOut(**session_fields(s, now, gateway)) for s in sessions]


async def session_detail(services: Services, session: SessionRecord) -> SessionDetail:
    now = services.now()
    consumers = await list_consumers(services.store, session.id)
    scans = await list_results(services.store, project=None, session_id=session.id,
                               limit=1000)
    live = [c.endpoint for c in sorted(consumers, key=lambda c: (c.rank, c.job_id))
            if c.state(now) == "live"]
    return SessionDetail(
        **session_fields(session, now, await gateway_info(services), live),
        consumers=[consumer_out(c, now) for c in consumers], scans=[scan_out(r) for r in scans],
        counters=counters(consumers, await count_jobs(services.store, session.id), scans, now))


# --- handlers ------------------------------------------------------------------------------------

def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


async def open_session_view(request: web.Request) -> web.Response:
    body = await parse_body(request, SessionOpen)  # already read once, for the policy decision
    services = _services(request)
    session, token = await open_session(services, request[CLAIMS], body)
    await publish_session(services, session.id)
    opened = SessionOpened(**session_fields(session, services.now(), await gateway_info(services)),
                           token=token, token_expires_at=utc(session.expires_at))
    return reply(opened, 201, {"Location": f"/api/v1/sessions/{session.id}",
                               "Cache-Control": "no-store"})


async def list_sessions_view(request: web.Request) -> web.Response:
    query = parse_query(request, SessionQuery)
    services, claims = _services(request), request[CLAIMS]
    project = claims.project if claims.project is not None else query.project
    sessions = await list_sessions(services.store, project)
    return reply(SessionList(items=await summaries(services, sessions)))


async def get_session_view(request: web.Request) -> web.Response:
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    return reply(await session_detail(services, session))


async def end_session_view(request: web.Request) -> web.Response:
    services = _services(request)
    session = await end_session(services.store, request.match_info["session"], services.now())
    await publish_session(services, session.id)
    await cancel_jobs(services, session.id)
    return reply(await session_detail(services, session))


async def register_consumer_view(request: web.Request) -> web.Response:
    body = await parse_body(request, ConsumerRegister)
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    consumer = await add_consumer(services, session, body)
    await publish_session(services, session.id)
    return reply(consumer_out(consumer, services.now()), 201,
                 {"Location": f"/api/v1/sessions/{session.id}/consumers/{consumer.id}"})


async def heartbeat_view(request: web.Request) -> web.Response:
    services = _services(request)
    consumer = await renew_lease(services.store, request.match_info["session"],
                                 request.match_info["consumer"], services.settings.lease_s,
                                 services.now())
    return reply(consumer_out(consumer, services.now()))


async def leave_view(request: web.Request) -> web.Response:
    services = _services(request)
    consumer = await leave(services.store, request.match_info["session"],
                           request.match_info["consumer"], services.now())
    await publish_session(services, consumer.session_id)
    return reply(consumer_out(consumer, services.now()))


async def submit_job_view(request: web.Request) -> web.Response:
    body = await parse_body(request, JobSubmit)  # already read once, for the policy decision
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    job, status = await submit_job(services, request[CLAIMS], session, body)
    return reply(job_out(job, status), 202,
                 {"Location": f"/api/v1/sessions/{session.id}/jobs/{job.id}"})


async def get_job_view(request: web.Request) -> web.Response:
    services = _services(request)
    session_id, job_id = request.match_info["session"], request.match_info["job"]
    job = await get_job(services.store, session_id, job_id)
    if job is None:
        raise NotFound(f"session {session_id} has no job {job_id!r}")
    return reply(job_out(job, await job_status(services, job)))


async def report_result_view(request: web.Request) -> web.Response:
    body = await parse_body(request, ScanReport)
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    record = scan_record(session, scan_number(request), body, services.now())
    return reply(scan_out(await record_result(services.store, record)))


async def list_results_view(request: web.Request) -> web.Response:
    query = parse_query(request, ScanQuery)
    services, claims = _services(request), request[CLAIMS]
    project = claims.project if claims.project is not None else query.project
    results = await list_results(services.store, project=project, session_id=query.session,
                                 limit=query.limit)
    return reply(ScanList(items=[scan_out(r) for r in results]))


# --- resources named by each action --------------------------------------------------------------

async def _session_project(request: web.Request, claims: Claims | None) -> str | None:
    """The project of the session in the path, for the policy; None before authentication (the
    refusal is audited without a lookup)."""
    if claims is None:
        return None
    return (await existing_session(_services(request), request.match_info["session"])).project


async def _session(request: web.Request, claims: Claims | None) -> Resource:
    return Resource(kind="session", project=await _session_project(request, claims),
                    name=request.match_info["session"])


async def _opening(request: web.Request, claims: Claims | None) -> Resource:
    # The template named in the body decides (template-bound action): read it before deciding.
    if claims is None:
        return Resource(kind="session", project=None, name=None)
    body = await parse_body(request, SessionOpen)
    return Resource(kind="session", project=body.project, name=body.template)


async def _job_launch(request: web.Request, claims: Claims | None) -> Resource:
    # Launching a consumer job opens the session's compute side from a job template: the project
    # must be allowed that template, like a DSN template.
    if claims is None:
        return Resource(kind="session", project=None, name=None)
    project = await _session_project(request, claims)
    body = await parse_body(request, JobSubmit)
    return Resource(kind="session", project=project,
                    name=job_template_name(_services(request), body))


async def _scan(request: web.Request, claims: Claims | None) -> Resource:
    project = await _session_project(request, claims)
    return Resource(kind="scan", project=project,
                    name=f"{request.match_info['session']}/{request.match_info['scan']}")


def _listing(kind: str) -> ResourceOf:
    def resource(request: web.Request, claims: Claims | None) -> Resource:
        # A project-bound token lists its own project unless it names another (then the policy
        # refuses: cross-project); an admin lists one project or all.
        named = request.query.get("project")
        own = claims.project if claims is not None else None
        return Resource(kind=kind, project=named or own, name=None)
    return resource


SESSIONS_PATH = "/api/v1/sessions"
SESSION_PATH = SESSIONS_PATH + "/{session}"

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("POST", SESSIONS_PATH, open_session_view,
              "Open a streaming session (returns its session token once)", SessionOpened, 201,
              "sessions:open", PROJECT_ONLY, _opening, SessionOpen, tag="sessions"),
    RouteSpec("GET", SESSIONS_PATH, list_sessions_view, "List sessions", SessionList, 200,
              "sessions:read", ADMIN_OR_PROJECT, _listing("session"), query=SessionQuery,
              tag="sessions"),
    RouteSpec("GET", SESSION_PATH, get_session_view,
              "Inspect a session: consumers, scans, counters", SessionDetail, 200,
              "sessions:read", ADMIN_OR_PROJECT, _session, tag="sessions"),
    RouteSpec("DELETE", SESSION_PATH, end_session_view,
              "End a session (idempotent): its tokens are revoked, its jobs cancelled",
              SessionDetail, 200, "sessions:end", ADMIN_OR_PROJECT, _session, tag="sessions"),
    RouteSpec("POST", SESSION_PATH + "/consumers", register_consumer_view,
              "Register a consumer rank's endpoint and take a lease", ConsumerOut, 201,
              "consumers:register", CONSUMER_ONLY, _session, ConsumerRegister, tag="consumers"),
    RouteSpec("PUT", SESSION_PATH + "/consumers/{consumer}", heartbeat_view,
              "Renew a consumer's lease (heartbeat)", ConsumerOut, 200, "consumers:register",
              CONSUMER_ONLY, _session, tag="consumers"),
    RouteSpec("DELETE", SESSION_PATH + "/consumers/{consumer}", leave_view,
              "Leave the session (idempotent)", ConsumerOut, 200, "consumers:register",
              CONSUMER_ONLY, _session, tag="consumers"),
    RouteSpec("POST", SESSION_PATH + "/jobs", submit_job_view,
              "Render a job template and submit the consumer job", JobOut, 202, "sessions:open",
              PROJECT_ONLY, _job_launch, JobSubmit, tag="jobs"),
    RouteSpec("GET", SESSION_PATH + "/jobs/{job}", get_job_view, "Poll a consumer job", JobOut,
              200, "sessions:read", ADMIN_OR_PROJECT, _session, tag="jobs"),
    RouteSpec("POST", SESSION_PATH + "/scans/{scan}/result", report_result_view,
              "Record a scan's result (idempotent for the same report)", ScanOut, 200,
              "scans:report", CONSUMER_ONLY, _scan, ScanReport, tag="scans"),
    RouteSpec("GET", "/api/v1/scans", list_results_view, "List scan results", ScanList, 200,
              "scans:read", ADMIN_OR_PROJECT, _listing("scan"), query=ScanQuery, tag="scans"),
)
