"""``GET /api/v1/live`` over real HTTP: server-sent snapshots of the open sessions a caller may
read, authorized and audited once per connection, ended by a revoked token or an ended console
sign-in, bounded in lifetime and per token, and never holding up the service's shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer
from cp_helpers import ClientFactory, ControlPlane, start_control_plane
from test_cp_gateways import Pages, page_for
from test_cp_sessions_api import opened, project_token
from waiting import eventually_async

from common.clone import Registration
from common.keys import KeyPair
from controlplane import live, placement
from controlplane.console.auth import CSRF_HEADER
from controlplane.errors import Unavailable
from controlplane.schemas import utc

LIVE = "/api/v1/live"
# A bound on how long a test waits for the next event, so a broken stream fails rather than hangs.
EVENT_WAIT_S = 10.0


@pytest.fixture
async def pages() -> AsyncIterator[Pages]:
    served = Pages()
    app = web.Application()
    app.router.add_get("/{name}", served.handle)
    served.server = TestServer(app, host="127.0.0.1")
    await served.server.start_server()
    yield served
    await served.server.close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots every 50 ms, so a test sees several without waiting seconds."""
    monkeypatch.setattr(live, "INTERVAL_S", 0.05)


async def live_cp(aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> ControlPlane:
    cp = await start_control_plane(aiohttp_client, tmp_path / "state",
                                   gateway_metrics=(pages.url("edge1"),))
    await cp.create_project("alpha")
    await cp.create_project("beta")
    return cp


async def next_event(response: ClientResponse) -> tuple[str, Any] | None:
    """The next event: (name, parsed data), ("retry", ms), or None at the end of the stream."""
    name, data, retry = "message", [], None
    async with asyncio.timeout(EVENT_WAIT_S):
        while True:
            line = (await response.content.readline()).decode()
            if not line:
                return None
            line = line.rstrip("\n")
            if line == "":
                if data:
                    return name, json.loads("\n".join(data))
                if retry is not None:
                    return "retry", retry
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "retry":
                retry = int(value)


def live_rows(cp: ControlPlane) -> list[tuple[Any, ...]]:
    return [row for row in cp.audit_rows() if row[2] == "live:watch"]


async def test_once_sends_one_snapshot_of_every_open_session_with_consumers_jobs_and_counters(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    _alpha_token, alpha = await opened(cp, "alpha")
    cp.clock.advance(1)
    _beta_token, beta = await opened(cp, "beta")
    _ended_token, ended = await opened(cp, "beta")
    assert (await cp.admin("DELETE", f"/api/v1/sessions/{ended['id']}")).status == 200
    pages.pages["edge1"] = page_for(alpha["id"], beta["id"])

    response = await cp.admin("GET", f"{LIVE}?once=true")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    name, snapshot = await next_event(response) or ("", None)
    assert await next_event(response) is None  # one snapshot, then the end
    assert name == "snapshot"
    assert [s["id"] for s in snapshot["sessions"]] == [beta["id"], alpha["id"]]  # newest first
    assert [s["id"] for s in snapshot["inspected"]] == [beta["id"], alpha["id"]]
    assert snapshot["more"] == 0
    inspected = snapshot["inspected"][0]
    assert inspected["jobs"] == [] and inspected["consumers"] == []
    assert inspected["counters"]["consumers"] == 0  # the session route's own detail
    (gateway,) = snapshot["gateways"]
    assert gateway["up"] and {s["session"] for s in gateway["sessions"]} == {alpha["id"],
                                                                             beta["id"]}
    ((_, principal, _, resource, decision, rule, request_id),) = live_rows(cp)
    assert principal.startswith("admin:") and (resource, decision, rule) == (
        "session", "allow", "admins-administer")
    assert response.headers["X-Request-ID"] == request_id


async def test_a_project_token_sees_only_its_projects_sessions_and_counters(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    alpha_token, alpha = await opened(cp, "alpha")
    _beta_token, beta = await opened(cp, "beta")
    pages.pages["edge1"] = page_for(alpha["id"], beta["id"])

    response = await cp.call("GET", f"{LIVE}?once=true", alpha_token)
    assert response.status == 200
    _name, snapshot = await next_event(response) or ("", None)
    assert [s["id"] for s in snapshot["sessions"]] == [alpha["id"]]
    assert [s["id"] for s in snapshot["inspected"]] == [alpha["id"]]
    assert [s["session"] for s in snapshot["gateways"][0]["sessions"]] == [alpha["id"]]
    (row,) = live_rows(cp)
    assert (row[3], row[4], row[5]) == ("session/alpha", "allow", "project-members-watch-live")


async def test_an_admin_sees_the_registered_gateways_a_project_token_none(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages,
        curve_keypair: Callable[[], KeyPair]) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    store, now = cp.services.store, cp.clock()
    timeout_s = cp.settings.gateway_timeout_s
    # West's last announcement is older than the timeout: it is silent; east is live.
    await placement.register(store, "west", announcement(curve_keypair(), 7100),
                             now - timeout_s - 1)
    await placement.register(store, "east", announcement(curve_keypair(), 7000, capacity=3), now)
    alpha_token, alpha = await opened(cp, "alpha")
    assert alpha["gateway_name"] == "east"

    response = await cp.admin("GET", f"{LIVE}?once=true")
    _name, snapshot = await next_event(response) or ("", None)
    registered = snapshot["registered"]
    assert [(g["name"], g["live"], g["sessions"], g["capacity"], g["endpoint"])
            for g in registered] == [("east", True, 1, 3, "tcp://127.0.0.1:7000"),
                                     ("west", False, 0, 4, "tcp://127.0.0.1:7100")]
    assert datetime.fromisoformat(registered[1]["last_seen"]) == utc(now - timeout_s - 1)
    assert [s["gateway_name"] for s in snapshot["sessions"]] == ["east"]
    # The same records as the REST route's, read by the same function.
    listed = await (await cp.admin("GET", "/api/v1/gateways")).json()
    assert listed["registered"] == registered

    # A project token: its own session's gateway, but no registry (loads count every project).
    response = await cp.call("GET", f"{LIVE}?once=true", alpha_token)
    _name, own = await next_event(response) or ("", None)
    assert own["registered"] == []
    assert [s["gateway_name"] for s in own["sessions"]] == ["east"]


def announcement(keys: KeyPair, port: int, capacity: int = 4) -> Registration:
    return Registration(endpoint=f"tcp://127.0.0.1:{port}",
                        receipts_endpoint=f"tcp://127.0.0.1:{port + 1}",
                        server_key=keys.public.decode(), capacity=capacity)


async def test_refused_callers_and_a_bad_query(aiohttp_client: ClientFactory, tmp_path: Path,
                                               pages: Pages) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    _token, session = await opened(cp, "alpha")
    assert (await cp.call("GET", LIVE)).status == 401
    assert (await cp.call("GET", LIVE, session["token"])).status == 401
    narrow = (await cp.project_token("alpha", scope="projects:read"))["token"]
    refused = await cp.call("GET", LIVE, narrow)
    assert refused.status == 403 and "sessions:read" in (await refused.json())["detail"]
    bad = await cp.admin("GET", f"{LIVE}?once=maybe")
    assert bad.status == 400 and (await bad.json())["errors"][0]["field"] == "once"
    unknown = await cp.admin("GET", f"{LIVE}?every=1")
    assert unknown.status == 400


async def test_one_audit_record_per_connection_however_many_snapshots(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages, quick: None) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    response = await cp.admin("GET", LIVE)
    for _ in range(5):
        event = await next_event(response)
        assert event is not None and event[0] == "snapshot"
    assert len(live_rows(cp)) == 1
    response.close()


async def test_a_revoked_tokens_stream_is_told_it_is_signed_out_and_ends(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages, quick: None) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    issued = await cp.project_token("alpha")
    response = await cp.call("GET", LIVE, issued["token"])
    first = await next_event(response)
    assert first is not None and first[0] == "snapshot"
    assert (await cp.admin("DELETE", f"/api/v1/tokens/{issued['jti']}")).status in (200, 204)
    event = await next_event(response)
    while event is not None and event[0] == "snapshot":  # one may have been on its way
        event = await next_event(response)
    assert event is not None and event[0] == "signed-out"
    assert "revoked" in event[1]["reason"]
    assert await next_event(response) is None


async def test_an_ended_console_sign_in_ends_its_stream(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages, quick: None) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    signed_in = await cp.call("POST", "/ui/session", cp.admin_token)
    assert signed_in.status == 201
    csrf = (await signed_in.json())["csrf_token"]
    response = await cp.call("GET", LIVE)  # the cookie alone
    assert response.status == 200
    assert (await next_event(response) or ("",))[0] == "snapshot"
    assert (await cp.call("DELETE", "/ui/session", headers={CSRF_HEADER: csrf})).status in (
        200, 204)
    event = await next_event(response)
    while event is not None and event[0] == "snapshot":
        event = await next_event(response)
    assert event is not None and event[0] == "signed-out"
    assert "console session has ended" in event[1]["reason"]
    (row,) = live_rows(cp)
    assert row[1].endswith(" via console")


async def test_a_stream_ends_after_its_lifetime_telling_the_browser_to_reconnect(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages, quick: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "LIFETIME_S", 0.3)
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    response = await cp.admin("GET", LIVE)
    events = []
    while (event := await next_event(response)) is not None:
        events.append(event)
    assert events[-1] == ("retry", live.RETRY_MS)
    assert {name for name, _ in events[:-1]} == {"snapshot"} and len(events) >= 2


async def test_a_token_holds_at_most_four_streams(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages, quick: None) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    streams = [await cp.admin("GET", LIVE) for _ in range(live.MAX_STREAMS_PER_TOKEN)]
    assert [r.status for r in streams] == [200] * live.MAX_STREAMS_PER_TOKEN
    refused = await cp.admin("GET", LIVE)
    assert refused.status == 429
    assert "4 live streams open" in (await refused.json())["detail"]
    other = await cp.call("GET", f"{LIVE}?once=true", await project_token(cp, "alpha"))
    assert other.status == 200  # the limit is per token
    streams[0].close()  # the client goes away: the server notices at its next write

    async def admitted() -> bool:
        response = await cp.admin("GET", f"{LIVE}?once=true")
        return response.status == 200
    await eventually_async(admitted, timeout_s=EVENT_WAIT_S, what="a fifth stream admitted")
    for response in streams[1:]:
        response.close()


async def test_the_service_shuts_down_at_once_with_a_stream_open(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    response = await cp.admin("GET", LIVE)
    assert (await next_event(response) or ("",))[0] == "snapshot"
    # Without the stream ending itself, the server would wait its shutdown timeout (60 s).
    async with asyncio.timeout(EVENT_WAIT_S):
        await cp.client.server.close()
    assert await next_event(response) is None


async def test_a_failure_once_the_stream_has_begun_ends_it_cleanly(
        aiohttp_client: ClientFactory, tmp_path: Path, pages: Pages, quick: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cp = await live_cp(aiohttp_client, tmp_path, pages)
    response = await cp.admin("GET", LIVE)
    assert (await next_event(response) or ("",))[0] == "snapshot"

    async def unavailable(*_args: Any) -> None:
        raise Unavailable("the store cannot be read")
    monkeypatch.setattr(live, "gateway_list", unavailable)
    assert await next_event(response) is None  # the end, not a problem document mid-stream
    assert "the store cannot be read" in caplog.text
    assert (await cp.admin("GET", "/healthz")).status == 200


def test_an_event_carries_each_line_of_its_data_as_a_data_field() -> None:
    assert live.event("snapshot", '{"a": 1}') == b'event: snapshot\ndata: {"a": 1}\n\n'
    assert live.event("x", "one\ntwo") == b"event: x\ndata: one\ndata: two\n\n"
    assert live.retry(2000) == b"retry: 2000\n\n"


def test_details_are_read_again_when_the_sessions_change_or_every_few_snapshots() -> None:
    cadence = live.Cadence()
    assert cadence.due(("a",))  # the first snapshot
    assert [cadence.due(("a",)) for _ in range(live.DETAIL_EVERY)] == [False] * (
        live.DETAIL_EVERY - 1) + [True]
    assert cadence.due(("a", "b"))  # a session opened
    assert not cadence.due(("a", "b"))
    assert cadence.due(("b",))  # one ended
