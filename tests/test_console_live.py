"""The console's live page in headless Chromium: the gateway's row, and a session opened through
the API appearing without a reload, for an admin and (its own project's only) for a project
member; the registered gateways, live or silent, and the gateway each session is placed on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zmq
from browser import Page, Site
from cp_helpers import metric
from waiting import eventually

from common.clone import Registration
from common.keys import KeyPair, load_keypair
from controlplane import placement
from controlplane.settings import DATABASE_NAME
from controlplane.store.engine import Store
from dataplane.producer import Producer

# The shipped 4dstem template's detector: 576 x 576 uint16 frames in 4 sectors of 144 rows.
FRAME, SECTORS = (576, 576), 4
SECTOR = np.zeros((FRAME[0] // SECTORS, FRAME[1]), dtype=np.uint16)


def project_with_token(site: Site, name: str) -> str:
    site.api("POST", "/api/v1/projects", site.admin_token, {"name": name})
    issued = site.api("POST", f"/api/v1/projects/{name}/tokens", site.admin_token,
                      {"subject": "bob", "ttl": 3600})
    return str(issued["token"])


def open_session(site: Site, project: str, token: str,
                 client_key: bytes | None = None, lanes: int = 1) -> dict[str, Any]:
    return dict(site.api("POST", "/api/v1/sessions", token, {
        "project": project, "template": "4dstem", "params": {}, "lanes": lanes,
        "client_key": (client_key or zmq.curve_keypair()[0]).decode()}))


def local_registered(site: Site) -> bool:
    """Whether the site's own gateway has registered itself (under its key file's name, local)
    and is live: sessions opened from now on are placed on it."""
    listed = site.api("GET", "/api/v1/gateways", site.admin_token)["registered"]
    assert [g["name"] for g in listed if g["live"]] == ["local"], listed
    return True


def mark(page: Page) -> None:
    """A mark on the loaded document: it survives only while the page is not reloaded."""
    page.driver.execute_script("window.liveMark = 'still here'")


def still_marked(page: Page) -> bool:
    return bool(page.driver.execute_script("return window.liveMark") == "still here")


def test_a_session_opened_through_the_api_appears_without_a_reload(page: Page,
                                                                  console_site: Site) -> None:
    token = project_with_token(console_site, "live-demo-1")
    page.sign_in(console_site.admin_token)
    page.go("live")
    gateway = page.wait_text("#gateway-table tbody", console_site.metrics)
    assert "up" in gateway.text
    mark(page)
    session = open_session(console_site, "live-demo-1", token)
    row = page.wait_text("#session-table tbody", session["id"])
    assert "live-demo-1" in row.text and "4dstem" in row.text
    assert "No consumer has registered" in page.find(f"#live-session-{session['id']}").text
    # Once the gateway has the session (from the state service) its counters show, and two
    # samples later the session's rate.
    page.wait_text(f"tr.session-row[data-session='{session['id']}']", "MB/s")
    assert still_marked(page)


def test_a_project_member_sees_only_its_own_projects_sessions(page: Page,
                                                             console_site: Site) -> None:
    own_token = project_with_token(console_site, "live-demo-2")
    other_token = project_with_token(console_site, "live-demo-3")
    other = open_session(console_site, "live-demo-3", other_token)
    page.sign_in(own_token)
    page.go("live")
    page.wait_text("#gateway-table tbody", "up")
    eventually(lambda: local_registered(console_site), timeout_s=30, what="local registered")
    mark(page)
    own = open_session(console_site, "live-demo-2", own_token)
    row = page.wait_text("#session-table tbody", own["id"])
    assert "local" in row.text  # the site's gateway, registered: the session's placement
    assert other["id"] not in page.find("main").text
    assert page.find_all("#live-registry") == []  # the registry's loads are an admin's to see
    assert still_marked(page)


@contextmanager
def streaming(site: Site, client: KeyPair) -> Iterator[None]:
    """A producer sending one scan's frames, a few a second, until the block ends."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        server = load_keypair(site.server_key).public
        try:
            with Producer(site.gateway_endpoint, server, client, send_timeout_s=5) as producer:
                producer.begin_scan(1, (64, 64), producers=1, frame_shape=FRAME, sectors=SECTORS)
                frame = 0
                while not stop.wait(0.05):
                    for sector in range(SECTORS):
                        producer.send(frame, sector, SECTOR)
                    frame += 1
        except BaseException as exc:  # handed to the test's thread
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not failures, failures


@contextmanager
def draining(context: zmq.Context) -> Iterator[int]:
    """A consumer rank's PULL socket, read until the block ends; its port."""
    socket = context.socket(zmq.PULL)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            if socket.poll(100):
                socket.recv_multipart()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=5)
        socket.close(linger=0)


def test_a_streaming_scan_shows_with_its_rate_and_its_consumer(
        page: Page, console_site: Site, zmq_context: zmq.Context) -> None:
    token = project_with_token(console_site, "live-demo-4")
    client = KeyPair(*zmq.curve_keypair())
    session = open_session(console_site, "live-demo-4", token, client.public)
    worker = console_site.api("POST", "/api/v1/token", token, {"kind": "consumer"})["token"]
    with draining(zmq_context) as port:
        console_site.api("POST", f"/api/v1/sessions/{session['id']}/consumers", worker, {
            "endpoint": f"tcp://127.0.0.1:{port}", "rank": 0, "job_id": "job-1",
            "host": "node-1"})
        eventually(lambda: metric(console_site.metrics, "dsn_gateway_consumers_connected",
                                  session["id"]) == 1, timeout_s=60,
                   what="the gateway to connect to the consumer")
        page.sign_in(token)
        page.go("live")
        with streaming(console_site, client):
            row = page.wait_text("#scan-table tbody", session["id"])
            assert "1 of 1" in row.text  # consumers connected
            eventually(lambda: _forwarding(page), timeout_s=20, what="a rate above 0 MB/s")
        consumers = page.find(f"#live-session-{session['id']} .consumer-table")
        assert "node-1" in consumers.text and "s left" in consumers.text


def _forwarding(page: Page) -> bool:
    text = page.find("#scan-table tbody").text
    assert "MB/s" in text and "0.00 MB/s" not in text, text
    return True


def live_watch_records(site: Site, project: str) -> int:
    """The console's live:watch audit records of ``project``'s token."""
    listed = site.api("GET", f"/api/v1/audit?action=live:watch&principal=%40{project}"
                             "&limit=1000", site.admin_token)
    return sum(item["principal"].endswith(" via console") for item in listed["items"])


def count_closed_streams(page: Page) -> None:
    """From now on, window.closedStreams counts the page's EventSources closed."""
    page.driver.execute_script(
        "window.closedStreams = 0; const close = EventSource.prototype.close;"
        "EventSource.prototype.close = function () { window.closedStreams += 1;"
        " return close.call(this); };")


def test_an_open_live_page_is_audited_once_and_closes_its_stream_when_left(
        page: Page, console_site: Site) -> None:
    token = project_with_token(console_site, "live-demo-5")
    open_session(console_site, "live-demo-5", token)
    page.sign_in(token)
    # The sign-in shows the live page first: its connection audited (before its first
    # snapshot), leave it before counting.
    page.wait_text("#live-status", "Updated")
    page.go("scans")
    page.find("#scan-list")
    before = live_watch_records(console_site, "live-demo-5")
    count_closed_streams(page)
    page.go("live")
    seen: set[str] = set()

    def snapshots() -> bool:  # each snapshot stamps the status line with its time (seconds)
        seen.add(page.find("#live-status").text)
        return len({text for text in seen if text.startswith("Updated")}) >= 3
    eventually(snapshots, timeout_s=20, what="three snapshots shown")
    assert live_watch_records(console_site, "live-demo-5") == before + 1
    page.go("scans")
    eventually(lambda: page.driver.execute_script("return window.closedStreams") == 1,
               timeout_s=5, what="the live page's stream closed when it was left")


def test_the_live_page_signs_out_by_itself_when_its_token_is_revoked(
        page: Page, console_site: Site) -> None:
    admin = console_site.admin_token
    console_site.api("POST", "/api/v1/projects", admin, {"name": "live-demo-6"})
    issued = console_site.api("POST", "/api/v1/projects/live-demo-6/tokens", admin,
                              {"subject": "bob", "ttl": 3600})
    page.sign_in(issued["token"])
    page.wait_text("#live-status", "Updated")
    console_site.api("DELETE", f"/api/v1/tokens/{issued['jti']}", admin)
    # No navigation: the stream's next check says signed-out, and the shell shows the sign-in.
    status = page.wait_text("#sign-in-status", "Signed out")
    assert "revoked" in status.text


def announce(site: Site, name: str, at: float) -> None:
    """Gateway ``name``'s announcement stored as seen at ``at``, as the state service stores one
    (into the site's own database, beside the running control plane)."""
    async def store_it() -> None:
        store = await Store.open(site.state_dir / DATABASE_NAME)
        try:
            await placement.register(store, name, Registration(
                endpoint="tcp://127.0.0.1:7300", receipts_endpoint="tcp://127.0.0.1:7301",
                server_key=zmq.curve_keypair()[0].decode(), capacity=4), at)
        finally:
            await store.close()
    asyncio.run(store_it())


def test_registered_gateways_show_live_or_silent_and_each_session_its_gateway(
        page: Page, console_site: Site) -> None:
    token = project_with_token(console_site, "live-demo-7")
    page.sign_in(console_site.admin_token)
    page.go("live")
    eventually(lambda: local_registered(console_site), timeout_s=30, what="local registered")
    local = page.wait_text("#registry-table tr.registry-row[data-gateway='local']", "live")
    assert console_site.gateway_endpoint in local.text and "s ago)" in local.text
    assert page.find("tr.registry-row[data-gateway='local'] .live-up").text == "live"
    mark(page)
    # A second gateway, edge-gone, announced a minute ago and again now: live and empty, it is
    # the least loaded (ties go by name), so the next session is placed on it.
    now = time.time()
    announce(console_site, "edge-gone", now - 60)
    announce(console_site, "edge-gone", now)
    session = open_session(console_site, "live-demo-7", token)
    assert session["gateway_name"] == "edge-gone"
    page.wait_text("tr.registry-row[data-gateway='edge-gone']", "1 of 4")
    placed = page.wait_text(f"tr.session-row[data-session='{session['id']}']", "edge-gone")
    assert "moved" not in placed.text
    # Then it fell silent: its last announcement, 30 s ago, is older than the site's
    # gateway.timeout_s (10 s). The control plane moves its session to local.
    announce(console_site, "edge-gone", now - 30)
    page.wait_text("tr.registry-row[data-gateway='edge-gone'] .live-silent", "silent since")
    assert page.find_all("tr.registry-row[data-gateway='edge-gone'] .live-up") == []
    gone = page.wait_text("tr.registry-row[data-gateway='edge-gone']", "0 of 4")
    assert "s ago)" in gone.text  # its last heartbeat, half a minute ago
    row = page.wait_text(f"tr.session-row[data-session='{session['id']}']",
                         "moved from edge-gone")
    assert "local, moved from edge-gone" in row.text
    # Back, and empty: a session of two lanes takes it and local, each row naming its lanes.
    announce(console_site, "edge-gone", time.time())
    laned = open_session(console_site, "live-demo-7", token, lanes=2)
    assert [lane["name"] for lane in laned["lanes"]] == ["edge-gone", "local"]
    page.wait_text(f"tr.session-row[data-session='{laned['id']}']",
                   "edge-gone (lane 0), local (lane 1)")
    assert still_marked(page)
