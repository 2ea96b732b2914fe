"""``GET /api/v1/live``: what the console's live view shows, as a stream of server-sent events.

A page that polled the REST routes every 2 s was authorized, rate-limited and audited at every
poll. This route is authorized and audited once per connection (``middlewares.authorize``), then
sends an ``event: snapshot`` every ``INTERVAL_S``: one JSON ``LiveSnapshot`` of the open sessions
the caller may read (an admin every one, a project token its own project's), the newest
``MAX_INSPECTED`` of them with their consumers and jobs, the gateways' counters of those sessions
and, for an admin, the registered gateways with their loads, each read with the same functions and
models as the session, job and gateway routes.

Before every later snapshot the caller's credential is checked again exactly as a new request
would check it (revoked or expired token, ended console session): if it no longer holds, an
``event: signed-out`` names the reason and the stream ends. A stream lasts at most
``LIFETIME_S`` and then ends with a ``retry:`` field, so a browser's EventSource reconnects (one
more audited connection); a token holds at most ``MAX_STREAMS_PER_TOKEN`` streams at once (429
beyond). A stream ends when its client goes away (the next write fails) and at once when the app
shuts down (``stop_streams``), so shutting down never waits for open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Final

from aiohttp import web

from controlplane.errors import ControlPlaneError, MissingToken, RateLimited, TokenError
from controlplane.gateways import SCRAPER, Scraper, gateway_list, registered_gateways
from controlplane.middlewares import (
    CALLER,
    CLAIMS,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    SERVICES,
    RouteSpec,
    Services,
    request_caller,
)
from controlplane.policy import Resource
from controlplane.schemas import utc
from controlplane.sessions.api import session_detail, session_jobs, summaries
from controlplane.sessions.core import SessionRecord
from controlplane.sessions.models import (
    LiveEvent,
    LiveQuery,
    LiveSession,
    LiveSnapshot,
    SignedOutEvent,
)
from controlplane.sessions.repository import list_sessions
from controlplane.tokens import Claims
from controlplane.views import ADMIN_OR_PROJECT, parse_query

log = logging.getLogger("dsn.controlplane.live")

LIVE_PATH: Final = "/api/v1/live"
INTERVAL_S: Final = 2.0
LIFETIME_S: Final = 600.0
RETRY_MS: Final = 2000  # how long the browser waits before it reconnects to an ended stream
MAX_STREAMS_PER_TOKEN: Final = 4
MAX_INSPECTED: Final = 8
# Consumers and jobs (a job's state may ask its launcher) are read again every DETAIL_EVERY
# snapshots, or at once when the inspected sessions change; the rest at every snapshot.
DETAIL_EVERY: Final = 5


# --- what is sent (no I/O) -----------------------------------------------------------------------

def event(name: str, data: str) -> bytes:
    """One server-sent event; every line of ``data`` is a ``data:`` field."""
    lines = [f"event: {name}", *(f"data: {line}" for line in data.split("\n"))]
    return ("\n".join(lines) + "\n\n").encode()


def retry(ms: int) -> bytes:
    return f"retry: {ms}\n\n".encode()


def open_newest(sessions: Sequence[SessionRecord], now: float) -> list[SessionRecord]:
    """The sessions open at ``now``, newest first."""
    return sorted((s for s in sessions if s.state(now) == "open"),
                  key=lambda s: s.created_at, reverse=True)


class Cadence:
    """When one stream reads its inspected sessions' detail again: when they change, or every
    ``DETAIL_EVERY`` snapshots."""

    def __init__(self) -> None:
        self._ids: tuple[str, ...] | None = None
        self._age = 0

    def due(self, ids: tuple[str, ...]) -> bool:
        self._age += 1
        if ids == self._ids and self._age < DETAIL_EVERY:
            return False
        self._ids, self._age = ids, 0
        return True


# --- reading -------------------------------------------------------------------------------------

async def live_session(services: Services, session: SessionRecord) -> LiveSession:
    detail = await session_detail(services, session)
    return LiveSession.model_validate({**detail.model_dump(),
                                       "jobs": await session_jobs(services, session.id)})


class Watch:
    """One stream's reads: each snapshot, with the inspected sessions' detail kept between the
    snapshots that do not read it again."""

    def __init__(self, services: Services, scraper: Scraper) -> None:
        self._services = services
        self._scraper = scraper
        self._cadence = Cadence()
        self._inspected: list[LiveSession] = []

    async def snapshot(self, own_project: str | None) -> LiveSnapshot:
        services, now = self._services, self._services.now()
        opened = open_newest(await list_sessions(services.store, own_project), now)
        shown = opened[:MAX_INSPECTED]
        if self._cadence.due(tuple(s.id for s in shown)):
            self._inspected = [await live_session(services, s) for s in shown]
        gateways = await gateway_list(services, self._scraper, own_project)
        return LiveSnapshot(at=utc(now), sessions=await summaries(services, opened),
                            inspected=self._inspected, more=len(opened) - len(shown),
                            gateways=gateways,
                            registered=await registered_gateways(services, own_project))


# --- the stream ----------------------------------------------------------------------------------

class Streams:
    """The app's open streams, counted per token, and the signal that the app shuts down."""

    def __init__(self) -> None:
        self.open: dict[str, dict[int, web.Request]] = {}  # by id(): requests are not hashable
        self.stopping = asyncio.Event()

    @contextlib.contextmanager
    def held(self, key: str, request: web.Request) -> Iterator[None]:
        streams = self.open.setdefault(key, {})
        # A stream whose client has left ends only at its next write: it no longer counts, or a
        # page reloaded a few times in a row would be refused its own stream.
        for gone in [ident for ident, stream in streams.items() if _gone(stream)]:
            del streams[gone]
        if len(streams) >= MAX_STREAMS_PER_TOKEN:
            raise RateLimited(f"this token has {MAX_STREAMS_PER_TOKEN} live streams open, the "
                              "most it may hold at once: close one first",
                              retry_after_s=int(INTERVAL_S))
        streams[id(request)] = request
        try:
            yield
        finally:
            streams.pop(id(request), None)
            if not streams and self.open.get(key) is streams:
                del self.open[key]

    async def stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True at once if the app shuts down meanwhile."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True


STREAMS: Final = web.AppKey("live_streams", Streams)


async def stop_streams(app: web.Application) -> None:
    """``on_shutdown``: every open stream ends now, so the server does not wait for them."""
    app[STREAMS].stopping.set()


async def _recheck(request: web.Request, services: Services) -> Claims:
    """The caller's claims, checked again as a new request's would be."""
    caller = await request_caller(request, services, services.surface(ADMIN_OR_PROJECT))
    if caller.claims is None:  # a token's caller always has claims: fail closed anyway
        raise MissingToken("the stream's caller carries no token")
    return caller.claims


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _send(request: web.Request, response: web.StreamResponse, streams: Streams,
                once: bool) -> None:
    services = request.app[SERVICES]
    watch = Watch(services, request.app[SCRAPER])
    loop = asyncio.get_running_loop()
    ends = loop.time() + LIFETIME_S
    claims: Claims = request[CLAIMS]  # just checked by the route's authorization
    while True:
        await response.write(event("snapshot",
                                   (await watch.snapshot(claims.project)).model_dump_json()))
        if once:
            return
        if loop.time() + INTERVAL_S >= ends:
            await response.write(retry(RETRY_MS))
            return
        if await streams.stopped_within(INTERVAL_S) or _gone(request):
            return
        try:
            claims = await _recheck(request, services)
        except TokenError as exc:
            signed_out = SignedOutEvent(reason=exc.detail)
            await response.write(event("signed-out", signed_out.model_dump_json()))
            return


async def live_view(request: web.Request) -> web.StreamResponse:
    query = parse_query(request, LiveQuery)
    streams = request.app[STREAMS]
    with streams.held(request[CALLER].rate_key, request):
        # Sent before the handler returns, so the headers the middlewares add afterwards are
        # set here: the request id.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store",
                                               REQUEST_ID_HEADER: request[REQUEST_ID]})
        await response.prepare(request)
        try:
            await _send(request, response, streams, query.once)
        except ConnectionError:
            pass  # the client went away: nothing to say
        except ControlPlaneError as exc:
            # The answer has begun: no problem document can follow. The stream ends and the
            # browser reconnects, through the same checks as any request.
            log.warning("live stream %s ended: %s", request[REQUEST_ID], exc.detail)
        return response


def _watched(request: web.Request, claims: Claims | None) -> Resource:
    # A project token watches its own project's sessions; an admin every one.
    return Resource(kind="session", project=claims.project if claims is not None else None,
                    name=None)


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", LIVE_PATH, live_view,
              "The open sessions the caller may read (newest first; the newest 8 with their "
              "consumers and jobs), the gateways' counters of them and, for an admin, the "
              "registered gateways sessions are placed on, as server-sent events: an 'event: "
              "snapshot' every 2 s whose data is one JSON document (sessions, inspected, more, "
              "gateways, registered, at); 'event: signed-out' with the reason, then the end, "
              "once the token or console sign-in no longer holds. Authorized and audited once per "
              "connection; a stream ends after 10 minutes with 'retry:' (an EventSource "
              "reconnects); at most 4 streams per token (429 beyond); once=true sends one "
              "snapshot and ends", LiveEvent, 200, "live:watch", ADMIN_OR_PROJECT, _watched,
              query=LiveQuery, tag="sessions", response_content_type="text/event-stream",
              response_headers=("Cache-Control",)),
)
