"""Session operations over the services: opening a session, admitting consumers, submitting
and cancelling consumer jobs, publishing changes to the gateways. The HTTP layer calls these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zmq

from common import strictyaml
from common.answers import GatewayInfo
from common.clone import AckOutcome, Registration
from common.credentials import PlainCredentials
from common.keys import KeyFileError, load_keypair
from common.privatefs import create_private_file, private_dir
from common.receipts import GatewayReport
from common.results import PARTIAL, SPOOLED
from controlplane import placement
from controlplane.errors import (
    ConfigurationError,
    Conflict,
    ControlPlaneError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from controlplane.launchers import (
    TOKEN_NAME,
    JobHandle,
    JobSpec,
    JobStatus,
    Launcher,
    consumer_command,
    mpiexec_command,
)
from controlplane.middlewares import Services, resource_label
from controlplane.policy import Resource
from controlplane.schemas import utc
from controlplane.sessions.core import (
    ConsumerRecord,
    JobRecord,
    ScanRecord,
    SessionRecord,
    config_with_consumers,
    endpoint_problem,
    lease_until,
    lifetime,
)
from controlplane.sessions.models import (
    ConsumerRegister,
    JobSubmit,
    ScanReport,
    SessionOpen,
)
from controlplane.sessions.repository import (
    Chooser,
    get_session,
    insert_job,
    insert_session,
    list_consumers,
    list_jobs,
    live_sessions,
    move_session,
    record_result,
    register_consumer,
    stranded_sessions,
    unfinished_jobs,
    update_job_state,
)
from controlplane.store.engine import Conn, Store
from controlplane.store.projects import get_project
from controlplane.store.tokens import TokenRecord, add_token, revoke_token
from controlplane.templates import repository as template_versions
from controlplane.templates.base import Kind
from controlplane.templates.loader import Template, parse_template_cached
from controlplane.templates.render import render_values
from controlplane.tokens import Claims, TokenKind

log = logging.getLogger("dsn.controlplane.sessions")

SESSION_QUOTA = "sessions"  # open sessions a project may hold at once
CONSUMER_QUOTA = "consumers"  # live consumer ranks per session (and ranks per job)
CONFIG_NAME = "dsn.yaml"
OUTPUT_NAME = "output"
# The job template a launcher runs unless the request names another.
DEFAULT_JOB_TEMPLATES: Mapping[str, str] = {"local": "local-mpiexec", "slurm": "slurm-sbatch"}


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
    """The current stored version of template ``name`` (``templates.repository``) and its
    number; every render of a session or job goes through here."""
    try:
        found = await template_versions.current(store, name)
    except NotFound:
        raise InvalidRequest(f"no template named {name!r}",
                         errors=[{"field": "template", "message": "no such template"}]) from None
    if found.kind != kind:
        raise InvalidRequest(f"template {name!r} is a {found.kind} template, not a {kind} template",
                         errors=[{"field": "template", "message": f"not a {kind} template"}])
    # Checked when saved; parsing is CPU-bound, so it runs off the event loop.
    return await asyncio.to_thread(parse_template_cached, found.source), found.version


async def gateway_infos(services: Services, sessions: Iterable[SessionRecord]
                        ) -> dict[str | None, GatewayInfo]:
    """Where the producers of each of ``sessions`` stream, by gateway name (None: the configured
    gateway): a registered gateway's last announcement."""
    names: set[str | None] = set()
    for session in sessions:
        names.update(session.gateways or (None,))
    infos: dict[str | None, GatewayInfo] = {}
    if None in names:
        infos[None] = await configured_gateway(services)
    if names - {None}:
        registered = await placement.gateways(services.store)
        for name in names - {None}:
            assert name is not None
            record = registered.get(name)
            if record is None:  # the table keeps every gateway that ever registered
                raise ConfigurationError(f"gateway {name!r} is not registered")
            infos[name] = GatewayInfo(name=name, endpoint=record.endpoint,
                                      server_key=record.server_key,
                                      plain_endpoint=record.plain_endpoint,
                                      receipts_endpoint=record.receipts_endpoint)
    return infos


async def configured_gateway(services: Services) -> GatewayInfo:
    """The gateway of the settings (a single-gateway site's; sessions placed on none)."""
    path = services.settings.gateway_public_key_file
    try:
        pair = await asyncio.to_thread(load_keypair, path)
    except KeyFileError as exc:
        raise ConfigurationError(f"the gateway's server key is unavailable: {exc}") from None
    settings = services.settings
    return GatewayInfo(endpoint=settings.gateway_endpoint, server_key=pair.public.decode(),
                       plain_endpoint=settings.gateway_plain_endpoint,
                       receipts_endpoint=settings.gateway_receipts)


def _prepare_job_dir(jobs_dir: Path, job_id: str, config: dict[str, Any]) -> Path:
    """A fresh 0700 job directory holding the session's configuration (0600) and an output dir."""
    workdir = jobs_dir / job_id
    private_dir(jobs_dir)
    workdir.mkdir(mode=0o700)  # new: a job id is never reused
    private_dir(workdir / OUTPUT_NAME)
    create_private_file(workdir / CONFIG_NAME, strictyaml.dump(config).encode())
    return workdir


# --- operations ----------------------------------------------------------------------------------

def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


async def _session_limit(services: Services, project: str) -> int:
    record = await get_project(services.store, project)
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
        raise InvalidRequest("the project token carries no scope a session token may hold")
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


def _check_plaintext(services: Services, body: SessionOpen) -> None:
    if body.transport == "plain" and not services.policies.current.allow_plaintext:
        raise PermissionDenied("the policy does not allow unencrypted transport (allow_plaintext)",
                        rule="plaintext-not-allowed")


def _chooser(services: Services, project: str, plain: bool, lanes: int) -> Chooser:
    """The placement of a new session of ``project`` (``controlplane.placement``), else, when no
    gateway at all is live, the configured gateway where the settings allow it and the session
    has one lane. Live gateways that cannot take the session refuse it: falling back then would
    pass over the policy."""
    settings = services.settings

    async def place(conn: Conn) -> tuple[str, ...]:
        now = services.now()
        chosen = placement.choose_lanes(await placement.loads_in(conn, now), now,
                                        settings.gateway_timeout_s,
                                        services.policies.current.gateways_for(project),
                                        plain=plain, lanes=lanes)
        if chosen is not None:
            return tuple(gateway.name for gateway in chosen)
        if not settings.gateway_fallback or lanes > 1:
            raise Unavailable("no gateway is live: none has registered within the last "
                              f"{settings.gateway_timeout_s:g} s"
                              f"{'' if lanes == 1 else f', and {lanes} lanes need as many'}")
        if plain and settings.gateway_plain_endpoint is None:
            raise Conflict("the gateway has no plaintext ingress (gateway_plain_endpoint is unset)")
        return ()
    return place


def _with_plain_password(config: dict[str, Any], session_id: str,
                         token: str) -> dict[str, Any]:
    digest = PlainCredentials.of(session_id, token).password_sha256
    sessions = [{**session, "plain_password_sha256": digest} for session in config["sessions"]]
    return {**config, "sessions": sessions}


async def open_session(services: Services, parent: Claims, body: SessionOpen
                       ) -> tuple[SessionRecord, str]:
    now = services.now()
    _check_plaintext(services, body)
    cap = services.policies.current.lifetime_cap(TokenKind.SESSION)
    token, claims = _session_token(services, parent, lifetime(body.ttl, cap, parent.exp, now=now))
    session_id = _new_id("s")
    config, version = await _render_session(services, body, session_id, claims.exp)
    if body.transport == "plain":
        config = _with_plain_password(config, session_id, token)
    session = SessionRecord(id=session_id, project=body.project, template=body.template,
                            template_version=version, params=dict(body.params),
                            client_key=body.client_key, config=config, token_jti=claims.jti,
                            created_at=now, expires_at=float(claims.exp), ended_at=None)
    limit = await _session_limit(services, body.project)
    session = await insert_session(services.store, session, _token_record(claims, parent.jti),
                                   limit, now,
                                   _chooser(services, body.project, body.transport == "plain",
                                            body.lanes))
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
        raise InvalidRequest(f"endpoint refused: {problem}",
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
        "controlplane_url": settings.public_base_url,
        "controlplane_urls": ",".join(settings.job_controlplane_urls),
        "consumer_command": consumer_command()}
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
        raise InvalidRequest(f"{ranks} ranks exceed the quota of {limit} consumers per session",
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
    await add_token(services.store, _token_record(claims, parent.jti))
    services.metrics.tokens_issued.labels(claims.kind.value).inc()
    handle = await _submit(services, launcher, spec, claims.jti)
    job = JobRecord(id=job_id, session_id=session.id, template=job_template_name(services, body),
                    template_version=version, launcher=launcher.name,
                    native_id=handle.native_id, workdir=str(spec.workdir), ranks=body.ranks,
                    token_jti=claims.jti, submitted_at=services.now())
    await _remember_job(services.store, launcher, job)
    log.info("job %s of session %s submitted through %s", job_id, session.id, launcher.name)
    return job, await job_status(services, job)


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
        await revoke_token(services.store, jti, services.now())
        raise


async def _remember_job(store: Store, launcher: Launcher, job: JobRecord) -> None:
    try:
        await insert_job(store, job)
    except ControlPlaneError:
        # A job nobody can poll or stop through the API must not keep running.
        await launcher.cancel(job.handle())
        raise


LOST_DETAIL = ("the control plane restarted while this job ran; a local job is stopped with the "
               "control plane that started it, and its outcome was not recorded")


async def job_status(services: Services, job: JobRecord) -> JobStatus:
    """The job's state: stored once final (a fact, never asked again), else the launcher's view,
    stored when it changed. A job its launcher no longer knows is ``lost``."""
    stored = job.status()
    if stored.finished:
        return stored
    try:
        status = await _launcher(services, job.launcher).status(job.handle())
    except NotFound:
        status = JobStatus("lost", None, LOST_DETAIL)
    if status != stored:
        await update_job_state(services.store, job.id, status)
    return status


async def adopt_jobs(services: Services) -> None:
    """At start-up, ask again about every job not known to have finished: a Slurm job that ended
    while the control plane was down gets its true outcome, a local job from before is ``lost``.
    A launcher that cannot answer now is asked again at each job's next poll; after its first
    such answer its other jobs are not asked here, so a scheduler that is down delays the start
    by one timeout, not one per job."""
    silent: set[str] = set()
    for job in await unfinished_jobs(services.store):
        if job.launcher in silent:
            log.warning("job %s of session %s: state unknown at start-up: launcher %s did not "
                        "answer", job.id, job.session_id, job.launcher)
            continue
        try:
            status = await job_status(services, job)
        except ControlPlaneError as exc:
            if isinstance(exc, Unavailable):
                silent.add(job.launcher)
            log.warning("job %s of session %s: state unknown at start-up: %s", job.id,
                        job.session_id, exc.detail)
            continue
        log.info("job %s of session %s adopted: %s", job.id, job.session_id, status.state)


async def cancel_job(services: Services, job: JobRecord) -> JobStatus:
    """Stop one job (idempotent) and return its status. Its consumer token is revoked first, at
    once even within a session's drain window, so a job the launcher cannot stop can no longer
    register or report: the session may be open, and a job cancelled because it misbehaves must
    not join it again. The gateway reports the scans its ranks leave unfinished (partial); a scan
    they still finish is written but not recorded (ending the session lets its jobs report). A job
    known to have finished, or one its launcher no longer knows (``lost``), has nothing left to
    stop."""
    await revoke_token(services.store, job.token_jti, services.now())
    if not job.status().finished:
        with contextlib.suppress(NotFound):  # job_status records it as lost
            await _launcher(services, job.launcher).cancel(job.handle())
            log.info("job %s of session %s cancelled", job.id, job.session_id)
    return await job_status(services, job)


async def cancel_jobs(services: Services, session_id: str) -> None:
    """Stop the jobs of an ended session: their ranks drain, reporting the scans they finish
    while their tokens last (``drain_s``); a job that cannot be stopped can no longer act once
    they are revoked, and a failure is logged rather than undoing the end."""
    for job in await list_jobs(services.store, session_id):
        if job.status().finished:
            continue
        launcher = services.launchers.get(job.launcher)
        try:
            if launcher is not None:
                await launcher.cancel(job.handle())
        except ControlPlaneError as exc:
            log.warning("could not cancel job %s of ended session %s: %s", job.id, session_id,
                        exc.detail)


async def register_gateway(services: Services, name: str, key: str,
                           registration: Registration) -> str | None:
    """Store gateway ``name``'s announcement (its heartbeat), or say why it is refused."""
    problem = placement.registration_problem(registration, key)
    if problem is None and await placement.register(services.store, name, registration,
                                                    services.now()):
        log.info("gateway %s registered: ingress %s, receipts %s, capacity %d", name,
                 registration.endpoint, registration.receipts_endpoint, registration.capacity)
    return problem


async def replace_stranded(services: Services, since: float) -> int:
    """Move the open sessions (each lane of them) of every gateway silent for longer than
    ``gateway_timeout_s`` to a live one (the placement rule; never one carrying another lane of
    the session), audit each move and publish it: the new gateway admits the session's
    producers, the old one drops it. Gateways are judged only once the service has run
    ``gateway_timeout_s`` (``since``: its start), so a restart moves nothing before they announce
    themselves again. A session is only ever moved to a gateway its project may use (policy
    section ``gateways``); one nowhere else can take stays, and is tried again next time."""
    now, timeout_s = services.now(), services.settings.gateway_timeout_s
    if now - since < timeout_s:
        return 0
    live = [name for name, record in (await placement.gateways(services.store)).items()
            if record.live(now, timeout_s)]
    moved = 0
    for session in await stranded_sessions(services.store, now, live):
        # One lane per round: the next round sees the session as this move left it.
        lane = next(lane for lane, name in enumerate(session.gateways) if name not in live)
        if await _replace_lane(services, session, lane, now):
            moved += 1
    return moved


async def _replace_lane(services: Services, session: SessionRecord, lane: int,
                        now: float) -> bool:
    """Move lane ``lane`` of ``session`` off its silent gateway; whether it moved."""
    timeout_s, silent = services.settings.gateway_timeout_s, session.gateways[lane]
    plain = bool(session.config["sessions"][0].get("plain_password_sha256"))
    allowance = services.policies.current.gateways_for(session.project)
    try:
        target = placement.choose(await placement.loads(services.store, now), now, timeout_s,
                                  allowance, plain=plain, exclude=session.gateways)
    except Unavailable as exc:  # none its project may use is live, or has room
        log.warning("session %s stays on silent gateway %s: %s", session.id, silent, exc.detail)
        return False
    if target is None:
        return False
    # Audited before it takes effect, like every decision.
    await services.audit.record(
        principal="controlplane", action="sessions:replace",
        resource=resource_label(Resource(kind="session", project=session.project,
                                         name=session.id)), decision="allow",
        rule=f"gateway-silent:{silent}->{target.name}",
        request_id=f"replace-{secrets.token_hex(8)}")
    if await move_session(services.store, session, lane, target.name, now, timeout_s) is None:
        return False  # ended, moved or the target filled up meanwhile: the next round looks again
    lanes = "" if session.lanes == 1 else f" (lane {lane} of {session.lanes})"
    log.warning("session %s%s moved from silent gateway %s to %s", session.id, lanes, silent,
                target.name)
    await publish_session(services, session.id)
    return True


async def record_gateway_report(services: Services, report: GatewayReport) -> AckOutcome:
    """Record a gateway's report of a scan no consumer will report, as the scan's ``gateway``
    result: ``spooled`` (the whole scan is in its spool file) or ``partial`` (interrupted: what
    was forwarded is listed lost, the rest spooled); nothing counted, every loss listed. Audited
    as the gateway's own action (its CURVE key was admitted by the state service)."""
    outcome = await _record_report(services, report)
    services.metrics.gateway_reports.labels(outcome).inc()
    return outcome


async def _record_report(services: Services, report: GatewayReport) -> AckOutcome:
    session = await get_session(services.store, report.session)
    if session is None:
        log.warning("gateway report for unknown session %s refused", report.session)
        return "refused"
    record = ScanRecord(
        session=session.id, scan=report.scan, project=session.project, path=report.spool,
        sha256="", frames=0, events=0, expected_sectors=report.accepted, received_sectors=0,
        duplicate_sectors=0, conflicting_duplicates=0, lost_sectors=report.lost,
        incomplete_frames=0, status=SPOOLED if report.outcome == "spooled" else PARTIAL,
        reported_at=services.now(), source="gateway", spooled_sectors=report.spooled,
        lost_by_reason=dict(report.dropped),
        loss_manifest=tuple(report.drops),
        manifest_truncated=report.drops_truncated, reason=report.reason,
        lane=report.lane or 0)
    resource = Resource(kind="scan", project=session.project, name=f"{session.id}/{report.scan}")
    # Audited first, like every request: a report that cannot be audited is not recorded.
    await services.audit.record(principal="gateway", action="scans:report",
                                resource=resource_label(resource), decision="allow",
                                rule="state-service:gateway-key",
                                request_id=f"gateway-report-{secrets.token_hex(8)}")
    try:
        stored = await record_result(services.store, record)
    except Conflict:
        log.error("gateway report for scan %d of session %s differs from the one recorded",
                  report.scan, session.id)
        return "refused"
    return "recorded" if stored is record else "duplicate"


def scan_record(session: SessionRecord, scan: int, body: ScanReport, now: float) -> ScanRecord:
    return ScanRecord.of(body.result(session.id, scan), project=session.project, reported_at=now)

