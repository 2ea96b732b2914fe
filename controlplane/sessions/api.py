"""The session routes: thin aiohttp handlers over ``service`` and ``repository``, the resource
each action names for the policy, and ``ROUTES``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from common.answers import GatewayInfo, SessionCounters
from controlplane.errors import InvalidRequest, NoScanFile, NotFound
from controlplane.launchers import JobStatus
from controlplane.middlewares import CLAIMS, SERVICES, ResourceOf, RouteSpec, Services
from controlplane.pictures import RenderedPictures
from controlplane.policy import Resource
from controlplane.schemas import utc
from controlplane.sessions.core import (
    ConsumerRecord,
    JobRecord,
    ScanRecord,
    SessionRecord,
    config_with_consumers,
)
from controlplane.sessions.models import (
    MAX_REPORT_BYTES,
    MAX_SCAN,
    ConsumerOut,
    ConsumerRegister,
    JobList,
    JobOut,
    JobSubmit,
    ScanDetail,
    ScanDetails,
    ScanList,
    ScanOut,
    ScanQuery,
    ScanReport,
    SessionDetail,
    SessionList,
    SessionOpen,
    SessionOpened,
    SessionOut,
    SessionQuery,
)
from controlplane.sessions.repository import (
    count_jobs,
    end_session,
    get_job,
    leave,
    list_consumers,
    list_jobs,
    list_results,
    list_sessions,
    record_result,
    renew_lease,
)
from controlplane.sessions.service import (
    add_consumer,
    cancel_job,
    cancel_jobs,
    existing_session,
    gateway_infos,
    job_status,
    job_template_name,
    open_session,
    publish_session,
    scan_record,
    submit_job,
)
from controlplane.tokens import Claims, TokenKind
from controlplane.views import ADMIN_OR_PROJECT, PROJECT_ONLY, parse_body, parse_query, reply

CONSUMER_ONLY = frozenset({TokenKind.CONSUMER})


def scan_number(request: web.Request) -> int:
    text = request.match_info["scan"]
    if not text.isascii() or not text.isdigit() or int(text) > MAX_SCAN:
        raise InvalidRequest("the scan number must be a non-negative integer",
                         errors=[{"field": "scan", "message": "not a scan number"}])
    return int(text)


# --- serialising ---------------------------------------------------------------------------------

def _time(ts: float | None) -> datetime | None:
    return None if ts is None else utc(ts)


def consumer_out(c: ConsumerRecord, session: SessionRecord, now: float) -> ConsumerOut:
    return ConsumerOut(id=c.id, session=c.session_id, job_id=c.job_id, rank=c.rank,
                       endpoint=c.endpoint, host=c.host, state=c.state(now),
                       registered_at=utc(c.registered_at),
                       lease_expires_at=utc(c.lease_expires_at), left_at=_time(c.left_at),
                       session_moved_at=_time(session.replaced_at))


def job_out(job: JobRecord, status: JobStatus) -> JobOut:
    return JobOut(id=job.id, session=job.session_id, template=job.template,
                  template_version=job.template_version, launcher=job.launcher, ranks=job.ranks,
                  state=status.state, exit_code=status.exit_code, detail=status.detail,
                  submitted_at=utc(job.submitted_at))


def scan_out(r: ScanRecord) -> ScanOut:
    values = {f.name: getattr(r, f.name) for f in fields(r)}
    return ScanOut.model_validate({**values, "reported_at": utc(r.reported_at)})


def scan_detail(r: ScanRecord) -> ScanDetail:
    return ScanDetail.model_validate({**scan_out(r).model_dump(),
                                      "loss_manifest": r.loss_manifest,
                                      "manifest_truncated": bool(r.manifest_truncated)})


def session_fields(s: SessionRecord, now: float, gateways: Mapping[str | None, GatewayInfo],
                   live: Sequence[str] = ()) -> dict[str, Any]:
    return {"id": s.id, "project": s.project, "template": s.template,
            "template_version": s.template_version, "params": s.params,
            "client_key": s.client_key, "state": s.state(now), "created_at": utc(s.created_at),
            "expires_at": utc(s.expires_at), "ended_at": _time(s.ended_at),
            "config": config_with_consumers(s.config, live), "gateway": gateways[s.gateway],
            "gateway_name": s.gateway, "previous_gateway": s.previous_gateway,
            "replaced_at": _time(s.replaced_at),
            "lanes": [gateways[name] for name in s.gateways] if s.lanes > 1 else []}


def counters(consumers: Sequence[ConsumerRecord], jobs: int, scans: Sequence[ScanRecord],
             now: float) -> SessionCounters:
    return SessionCounters(
        live_consumers=sum(c.state(now) == "live" for c in consumers), consumers=len(consumers),
        jobs=jobs, scans=len(scans), complete_scans=sum(r.status == "complete" for r in scans),
        frames=sum(r.frames for r in scans), events=sum(r.events for r in scans))


async def summaries(services: Services, sessions: Sequence[SessionRecord]) -> list[SessionOut]:
    if not sessions:  # an empty list needs no gateway key
        return []
    gateways, now = await gateway_infos(services, sessions), services.now()
    return [SessionOut(**session_fields(s, now, gateways)) for s in sessions]


async def session_detail(services: Services, session: SessionRecord) -> SessionDetail:
    now = services.now()
    consumers = await list_consumers(services.store, session.id)
    scans = await list_results(services.store, project=None, session_id=session.id,
                               limit=1000)
    live = [c.endpoint for c in sorted(consumers, key=lambda c: (c.rank, c.job_id))
            if c.state(now) == "live"]
    return SessionDetail(
        **session_fields(session, now, await gateway_infos(services, [session]), live),
        consumers=[consumer_out(c, session, now) for c in consumers],
        scans=[scan_out(r) for r in scans],
        counters=counters(consumers, await count_jobs(services.store, session.id), scans, now))


# --- handlers ------------------------------------------------------------------------------------

def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


async def open_session_view(request: web.Request) -> web.Response:
    body = await parse_body(request, SessionOpen)  # already read once, for the policy decision
    services = _services(request)
    session, token = await open_session(services, request[CLAIMS], body)
    await publish_session(services, session.id)
    opened = SessionOpened(**session_fields(session, services.now(),
                                            await gateway_infos(services, [session])),
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
    session = await end_session(services.store, request.match_info["session"], services.now(),
                                services.settings.drain_s)
    await publish_session(services, session.id)
    await cancel_jobs(services, session.id)
    return reply(await session_detail(services, session))


async def register_consumer_view(request: web.Request) -> web.Response:
    body = await parse_body(request, ConsumerRegister)
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    consumer = await add_consumer(services, session, body)
    await publish_session(services, session.id)
    return reply(consumer_out(consumer, session, services.now()), 201,
                 {"Location": f"/api/v1/sessions/{session.id}/consumers/{consumer.id}"})


async def heartbeat_view(request: web.Request) -> web.Response:
    services = _services(request)
    consumer = await renew_lease(services.store, request.match_info["session"],
                                 request.match_info["consumer"], services.settings.lease_s,
                                 services.now())
    # Read after the renewal: the heartbeat answer tells the job of a move at the latest one
    # lease period after it happened.
    session = await existing_session(services, consumer.session_id)
    return reply(consumer_out(consumer, session, services.now()))


async def leave_view(request: web.Request) -> web.Response:
    services = _services(request)
    consumer = await leave(services.store, request.match_info["session"],
                           request.match_info["consumer"], services.now())
    await publish_session(services, consumer.session_id)
    session = await existing_session(services, consumer.session_id)
    return reply(consumer_out(consumer, session, services.now()))


async def submit_job_view(request: web.Request) -> web.Response:
    body = await parse_body(request, JobSubmit)  # already read once, for the policy decision
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    job, status = await submit_job(services, request[CLAIMS], session, body)
    return reply(job_out(job, status), 202,
                 {"Location": f"/api/v1/sessions/{session.id}/jobs/{job.id}"})


async def _existing_job(services: Services, request: web.Request) -> JobRecord:
    session_id, job_id = request.match_info["session"], request.match_info["job"]
    job = await get_job(services.store, session_id, job_id)
    if job is None:
        raise NotFound(f"session {session_id} has no job {job_id!r}")
    return job


async def get_job_view(request: web.Request) -> web.Response:
    services = _services(request)
    job = await _existing_job(services, request)
    return reply(job_out(job, await job_status(services, job)))


async def session_jobs(services: Services, session_id: str) -> list[JobOut]:
    """The session's consumer jobs, oldest first, each with its launcher's current state."""
    return [job_out(job, await job_status(services, job))
            for job in await list_jobs(services.store, session_id)]


async def list_jobs_view(request: web.Request) -> web.Response:
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    return reply(JobList(items=await session_jobs(services, session.id)))


async def cancel_job_view(request: web.Request) -> web.Response:
    services = _services(request)
    job = await _existing_job(services, request)
    return reply(job_out(job, await cancel_job(services, job)))


async def report_result_view(request: web.Request) -> web.Response:
    services = _services(request)
    # A loss manifest makes a report far longer than any other body; the route admits consumer
    # tokens only, checked before the body is read.
    limit = max(MAX_REPORT_BYTES, services.settings.client_max_size)
    body = await parse_body(request, ScanReport, max_bytes=limit)
    session = await existing_session(services, request.match_info["session"])
    record = scan_record(session, scan_number(request), body, services.now())
    return reply(scan_out(await record_result(services.store, record)))


async def scan_results_view(request: web.Request) -> web.Response:
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    results = await list_results(services.store, project=None, session_id=session.id,
                                 scan=scan_number(request), limit=2)
    if not results:
        raise NotFound(f"scan {request.match_info['scan']} of session {session.id} has no result")
    return reply(ScanDetails(items=[scan_detail(r) for r in results]))


PICTURES: Final[dict[str, str]] = {"bright-field.png": "bright_field_png",
                                   "diffraction.png": "diffraction_png"}


async def scan_picture_view(request: web.Request) -> web.Response:
    """A picture of the file the consumer reported for the scan: only a file under the jobs
    directory whose SHA-256 is the reported one (controlplane.pictures)."""
    services = _services(request)
    session = await existing_session(services, request.match_info["session"])
    results = await list_results(services.store, project=None, session_id=session.id,
                                 scan=scan_number(request), limit=2)
    # A gateway's record of an interrupted scan names its spool file, not a scan file.
    record = next((r for r in results if r.source == "consumer" and r.sha256), None)
    if record is None:
        raise NoScanFile(f"no file for scan {request.match_info['scan']} of session {session.id}")
    picture = request.match_info["picture"]
    # The answer is the same as long as the reported file is: revalidated at each use, so a
    # revoked token stops seeing it.
    headers = {"ETag": f'"{record.sha256}-{picture}"', "Cache-Control": "private, no-cache"}
    if headers["ETag"] in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    rendered: RenderedPictures = await asyncio.to_thread(
        services.pictures.get_within, services.settings.jobs_dir, Path(record.path),
        record.sha256)
    return web.Response(body=getattr(rendered, PICTURES[picture]), headers=headers,
                        content_type="image/png")


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


async def _scans_listed(request: web.Request, claims: Claims | None) -> Resource:
    """A listing filtered to one session names that session's project: another project's session
    is refused by the policy (403), as on every other route, not answered with an empty list."""
    session = request.query.get("session")
    if session is None or claims is None:
        return _listed("scan", request, claims)
    project = (await existing_session(_services(request), session)).project
    return Resource(kind="scan", project=project, name=None)


def _listed(kind: str, request: web.Request, claims: Claims | None) -> Resource:
    # A project-bound token lists its own project unless it names another (then the policy
    # refuses: cross-project); an admin lists one project or all.
    named = request.query.get("project")
    own = claims.project if claims is not None else None
    return Resource(kind=kind, project=named or own, name=None)


def _listing(kind: str) -> ResourceOf:
    return lambda request, claims: _listed(kind, request, claims)


SESSIONS_PATH = "/api/v1/sessions"
SESSION_PATH = SESSIONS_PATH + "/{session}"

ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("POST", SESSIONS_PATH, open_session_view,
              "Open a streaming session (returns its session token once)", SessionOpened, 201,
              "sessions:open", PROJECT_ONLY, _opening, SessionOpen, tag="sessions",
              response_headers=("Location", "Cache-Control")),
    RouteSpec("GET", SESSIONS_PATH, list_sessions_view, "List sessions", SessionList, 200,
              "sessions:read", ADMIN_OR_PROJECT, _listing("session"), query=SessionQuery,
              tag="sessions"),
    RouteSpec("GET", SESSION_PATH, get_session_view,
              "Inspect a session: consumers, scans, counters", SessionDetail, 200,
              "sessions:read", ADMIN_OR_PROJECT, _session, tag="sessions"),
    RouteSpec("DELETE", SESSION_PATH, end_session_view,
              "End a session (idempotent): its session token is revoked, its jobs cancelled; "
              "their consumer tokens may report results and leave for the drain window",
              SessionDetail, 200, "sessions:end", ADMIN_OR_PROJECT, _session, tag="sessions"),
    RouteSpec("POST", SESSION_PATH + "/consumers", register_consumer_view,
              "Register a consumer rank's endpoint and take a lease", ConsumerOut, 201,
              "consumers:register", CONSUMER_ONLY, _session, ConsumerRegister, tag="consumers",
              response_headers=("Location",)),
    RouteSpec("PUT", SESSION_PATH + "/consumers/{consumer}", heartbeat_view,
              "Renew a consumer's lease (heartbeat)", ConsumerOut, 200, "consumers:register",
              CONSUMER_ONLY, _session, tag="consumers"),
    RouteSpec("DELETE", SESSION_PATH + "/consumers/{consumer}", leave_view,
              "Leave the session (idempotent)", ConsumerOut, 200, "consumers:register",
              CONSUMER_ONLY, _session, tag="consumers"),
    RouteSpec("POST", SESSION_PATH + "/jobs", submit_job_view,
              "Render a job template and submit the consumer job", JobOut, 202, "sessions:open",
              PROJECT_ONLY, _job_launch, JobSubmit, tag="jobs", response_headers=("Location",)),
    RouteSpec("GET", SESSION_PATH + "/jobs", list_jobs_view,
              "List the session's consumer jobs, oldest first, with their launcher states",
              JobList, 200, "sessions:read", ADMIN_OR_PROJECT, _session, tag="jobs"),
    RouteSpec("GET", SESSION_PATH + "/jobs/{job}", get_job_view, "Poll a consumer job", JobOut,
              200, "sessions:read", ADMIN_OR_PROJECT, _session, tag="jobs"),
    RouteSpec("DELETE", SESSION_PATH + "/jobs/{job}", cancel_job_view,
              "Cancel a consumer job (idempotent): its consumer token is revoked, its processes "
              "stopped", JobOut, 200, "sessions:end", ADMIN_OR_PROJECT, _session, tag="jobs"),
    RouteSpec("POST", SESSION_PATH + "/scans/{scan}/result", report_result_view,
              "Record a scan's result (idempotent for the same report)", ScanOut, 200,
              "scans:report", CONSUMER_ONLY, _scan, ScanReport, tag="scans",
              max_body=MAX_REPORT_BYTES),
    RouteSpec("GET", SESSION_PATH + "/scans/{scan}", scan_results_view,
              "A scan's results (the consumers' and, if it interrupted the scan, the gateway's) "
              "with their loss manifests", ScanDetails, 200, "scans:read", ADMIN_OR_PROJECT, _scan,
              tag="scans"),
    RouteSpec("GET", SESSION_PATH + "/scans/{scan}/pictures/{picture}", scan_picture_view,
              "A picture of the scan's file: its virtual bright-field image (bright-field.png) or "
              "diffraction pattern sum (diffraction.png), as a grayscale PNG (ETag); 404 when the "
              "scan has no file under the jobs directory, 409 when the file is not the one "
              "reported, 422 when it holds no electron events to picture", None, 200,
              "scans:read", ADMIN_OR_PROJECT, _scan, tag="scans", response_content_type="image/png",
              extra_responses=(304, 409, 422), request_headers=("If-None-Match",),
              response_headers=("ETag", "Cache-Control")),
    RouteSpec("GET", "/api/v1/scans", list_results_view, "List scan results", ScanList, 200,
              "scans:read", ADMIN_OR_PROJECT, _scans_listed, query=ScanQuery, tag="scans"),
)
