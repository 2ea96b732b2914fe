"""``GET /api/v1/gateways``: the gateways' per-session counters, read from their metrics pages.

The counters come from the metrics URLs the settings list (``gateway_metrics``). Each answer scrapes
every one of them at once, each within ``SCRAPE_TIMEOUT_S`` and ``MAX_METRICS_BYTES``; a gateway
that cannot be read, or whose page is not a Prometheus text exposition, is listed down with the
reason, never an error of the whole answer. A caller sees only the series of sessions it may see: an
admin every one, a project token those of its project's sessions (looked up in the store; a series
the store knows no session of is an admin's only). An admin's answer also lists the gateways that
registered themselves (``controlplane.placement``) with the open sessions placed on each and whether
it is live.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from controlplane import placement
from controlplane import schemas as s
from controlplane.errors import Unavailable
from controlplane.middlewares import CLAIMS, SERVICES, RouteSpec, Services
from controlplane.policy import Resource
from controlplane.sessions.repository import session_projects
from controlplane.tokens import Claims
from controlplane.views import ADMIN_OR_PROJECT, reply

SCRAPE_TIMEOUT_S: Final = 2.0
MAX_METRICS_BYTES: Final = 4 * 1024 * 1024
# Sample name on the page -> field of GatewaySessionOut (drops, by reason, are apart).
SERIES: Final = {
    "dsn_gateway_messages_total": "messages",
    "dsn_gateway_bytes_total": "bytes",
    "dsn_gateway_spooled_messages_total": "spooled_messages",
    "dsn_gateway_spooled_bytes_total": "spooled_bytes",
    "dsn_gateway_spool_files_total": "spool_files",
    "dsn_gateway_scans_open": "scans_open",
    "dsn_gateway_scans_interrupted_total": "scans_interrupted",
    "dsn_gateway_scans_idle_closed_total": "scans_idle_closed",
    "dsn_gateway_consumers": "consumers",
    "dsn_gateway_consumers_connected": "consumers_connected",
    "dsn_gateway_backpressure_waits_total": "backpressure_waits",
    "dsn_gateway_backpressure_seconds_total": "backpressure_seconds",
    "dsn_gateway_backpressure_waiting_seconds": "backpressure_waiting_seconds",
}
DROPS: Final = "dsn_gateway_drops_total"

# One session's values as read: field -> value, and "drops" -> {reason: count}.
Values = dict[str, Any]


class Scraper:
    """Reads metrics pages over one HTTP client session, kept for the app's lifetime."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def page(self, url: str) -> bytes:
        """The page's bytes; ``Unavailable`` naming why it cannot be had."""
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S), self._session.get(
                    url, allow_redirects=False, headers={"Accept": "text/plain"}) as response:
                if response.status != 200:
                    raise Unavailable(f"the metrics page answered HTTP {response.status}")
                if (response.content_length or 0) > MAX_METRICS_BYTES:
                    raise Unavailable(_too_large())
                # Counted as it arrives (decompressed, chunked or not): never more is held.
                raw = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    raw += chunk
                    if len(raw) > MAX_METRICS_BYTES:
                        raise Unavailable(_too_large())
        except TimeoutError:
            raise Unavailable(f"no answer within {SCRAPE_TIMEOUT_S:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"cannot be reached: {_reason(exc)}") from None
        return bytes(raw)


def _too_large() -> str:
    return f"the metrics page is larger than {MAX_METRICS_BYTES} bytes"


def _reason(exc: BaseException) -> str:
    # aiohttp's own text names the address and the OS error; nothing of the caller's is in it.
    return str(exc).strip() or type(exc).__name__


def parse_page(raw: bytes) -> dict[str, Values]:
    """Each session's values on a Prometheus text page; ``Unavailable`` if it is not one."""
    try:
        text = raw.decode("utf-8")
        by_session: dict[str, Values] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                _take(by_session, sample.name, sample.labels, sample.value)
    except (UnicodeDecodeError, ValueError, IndexError, KeyError, TypeError):
        raise Unavailable("the metrics page is not a Prometheus text exposition") from None
    return by_session


def _take(by_session: dict[str, Values], name: str, labels: dict[str, str],
          value: float) -> None:
    session = labels.get("session")
    if session is None or not math.isfinite(value):
        return
    field = SERIES.get(name)
    if field is not None:
        by_session.setdefault(session, {})[field] = value
    elif name == DROPS:
        drops = by_session.setdefault(session, {}).setdefault("drops", {})
        reason = labels.get("reason", "")
        drops[reason] = drops.get(reason, 0.0) + value


async def scrape(scraper: Scraper, url: str) -> tuple[dict[str, Values], str | None]:
    """The page's sessions and None, or nothing and the reason the gateway counts as down."""
    try:
        raw = await scraper.page(url)
        # Parsing a page of megabytes takes a while: off the event loop.
        return await asyncio.to_thread(parse_page, raw), None
    except Unavailable as exc:
        return {}, exc.detail


def visible(sessions: dict[str, Values], projects: dict[str, str],
            own_project: str | None) -> list[s.GatewaySessionOut]:
    """The series the caller may see: all (an admin, ``own_project`` None), else those of its own
    project's sessions."""
    return [s.GatewaySessionOut.model_validate({"session": session,
                                                "project": projects.get(session), **values})
            for session, values in sorted(sessions.items())
            if own_project is None or projects.get(session) == own_project]


SCRAPER: Final = web.AppKey("gateway_scraper", Scraper)


async def gateway_list(services: Services, scraper: Scraper,
                       own_project: str | None) -> list[s.GatewayOut]:
    """Every configured gateway, scraped now, with the series ``visible`` to the caller."""
    urls = services.settings.gateway_metrics
    scraped = await asyncio.gather(*(scrape(scraper, url) for url in urls))
    now = s.utc(services.now())
    ids: Iterable[str] = (session for sessions, _ in scraped for session in sessions)
    projects = await session_projects(services.store, list(ids))
    return [s.GatewayOut(url=url, up=reason is None, reason=reason, scraped_at=now,
                         sessions=visible(sessions, projects, own_project))
            for url, (sessions, reason) in zip(urls, scraped, strict=True)]


def registered_out(load: placement.Load, now: float,
                   timeout_s: float) -> s.RegisteredGatewayOut:
    """A registered gateway as answered: its record, times as UTC, its load and liveness."""
    gateway = load.gateway
    return s.RegisteredGatewayOut.model_validate({
        **asdict(gateway), "registered_at": s.utc(gateway.registered_at),
        "last_seen": s.utc(gateway.last_seen), "sessions": load.sessions,
        "live": gateway.live(now, timeout_s)})


async def registered_gateways(services: Services,
                              own_project: str | None) -> list[s.RegisteredGatewayOut]:
    """The registered gateways, their loads and whether they are live now; for an admin
    (``own_project`` None) only: the loads count every project's sessions."""
    if own_project is not None:
        return []
    now, timeout_s = services.now(), services.settings.gateway_timeout_s
    return [registered_out(load, now, timeout_s)
            for load in await placement.loads(services.store, now)]


async def list_gateways(request: web.Request) -> web.Response:
    services, project = request.app[SERVICES], request[CLAIMS].project
    items = await gateway_list(services, request.app[SCRAPER], project)
    return reply(s.GatewayList(items=items,
                               registered=await registered_gateways(services, project)))


def scraper_ctx() -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's Scraper, with its HTTP client session, for the app's lifetime."""
    async def open_scraper(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(raise_for_status=False) as session:
            app[SCRAPER] = Scraper(session)
            yield
    return open_scraper


def _gateways(request: web.Request, claims: Claims | None) -> Resource:
    # A project token reads its own project's series; an admin every one.
    return Resource(kind="gateway", project=claims.project if claims is not None else None,
                    name=None)


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("GET", "/api/v1/gateways", list_gateways,
              "The gateways' per-session counters, from their metrics pages (a gateway that "
              "cannot be read is listed down with the reason); a project token sees its own "
              "project's sessions only. An admin also sees the registered gateways sessions are "
              "placed on, their loads and whether they are live", s.GatewayList, 200,
              "gateways:read", ADMIN_OR_PROJECT, _gateways, tag="gateways"),
)
